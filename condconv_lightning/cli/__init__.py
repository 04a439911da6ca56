"""The command-line programs: ``condconv-convert`` (:mod:`.convert`) and ``condconv-finetune`` (:mod:`.finetune`).

They parse arguments, call the library and turn its errors into one line and an exit
status; loading, checking and converting live in :mod:`condconv_lightning.loading` and
:mod:`condconv_lightning.surgery`. :mod:`.listing` renders ``--list``.
"""
