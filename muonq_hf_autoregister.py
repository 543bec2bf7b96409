"""Opt-in registration of ``--optim muonq`` in every Python process, for launchers that start fresh interpreters.

``muonq_hf-autoregister.pth`` (installed into site-packages with the package, see setup.py) imports this
top-level module at interpreter start; it imports only ``os`` and ``sys``. With ``MUONQ_HF_REGISTER=1`` in the
environment it waits, importing nothing, until ``transformers`` is imported, then imports ``muonq_hf`` (which
registers ``muonq``). Without the variable it does nothing. It never raises: a failure prints one line to
stderr and the process goes on (without ``muonq``).
"""

import os
import sys

ENV = "MUONQ_HF_REGISTER"
_TRUE = ("1", "true", "yes", "on")


class _AfterTransformers:
    """A meta-path finder that finds nothing; it imports muonq_hf once ``transformers`` starts importing."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        try:
            import muonq_hf  # noqa: F401 - registers post-import hooks on transformers' submodules
        except Exception as exc:  # noqa: BLE001 - never break the user's process at start-up
            print(f"muonq_hf: {ENV}=1 but registering --optim muonq failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
        return None  # the normal finders load transformers


def install() -> None:
    """Called by the .pth at start-up: arm the finder when the switch is on."""
    if os.environ.get(ENV, "").strip().lower() not in _TRUE:
        return
    if "transformers" in sys.modules:
        import muonq_hf  # noqa: F401
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
