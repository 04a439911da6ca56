"""Everything in ``condconv_lightning.__all__`` resolves, and the Lightning part stays lazy."""

import subprocess
import sys

import condconv_lightning


def test_every_public_name_resolves():
    for name in condconv_lightning.__all__:
        assert getattr(condconv_lightning, name) is not None, name
    assert condconv_lightning.RoutingEntropyMonitor.__module__.startswith("condconv_lightning.callbacks")


def test_importing_the_package_does_not_import_lightning():
    code = "import sys, condconv_lightning; print('lightning.pytorch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
