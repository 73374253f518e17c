from __future__ import annotations

import subprocess
import sys


def test_import_loads_no_model_library():
    code = "import sys, qsched; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_names_resolve_to_the_api_not_modules():
    import qsched
    import qsched.scheduler  # noqa: F401  (a loaded submodule must not shadow a function)

    assert callable(qsched.wrap) and callable(qsched.unwrap) and callable(qsched.ramp)
    assert qsched.QSchedCoefficients.identity(2).is_identity
    for name in qsched.__all__:
        assert getattr(qsched, name) is not None
