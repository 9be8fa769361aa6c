"""Register peft-softprompt-ext's ``SOFT_PROMPT`` adapter type with PEFT the moment ``peft`` is imported.

``pip install peft-softprompt-ext`` puts ``peft_softprompt_ext_autoload.pth`` into site-packages; Python runs it at
start-up, and it imports this module, which only appends a finder to ``sys.meta_path``: no torch, no peft, nothing
imported but ``os`` and ``sys``. When a program first imports ``peft``, the finder lets peft load as usual, then
imports ``peft_softprompt_ext`` (which registers the type) and removes itself. So ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and tools that build models before any user code runs (lm-eval's ``peft=``) see the
type in a fresh process. ``PEFT_SOFTPROMPT_EXT_AUTOLOAD=0`` switches it off (then ``import peft_softprompt_ext``
yourself); ``python -S`` skips all ``.pth`` files.
"""

import os
import sys

ENV = "PEFT_SOFTPROMPT_EXT_AUTOLOAD"  # = constants.AUTOLOAD_ENV (the package can't be imported from here)
TRIGGER = "peft"


class _RegisterAfterExec:
    """Wraps peft's real loader: execute peft, put the real loader back, then register our type."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader
        _register()

    def __getattr__(self, name):  # resource readers, get_source...: the real loader's
        return getattr(self.loader, name)


class PeftImportHook:
    """A `sys.meta_path` finder that answers for ``peft`` only, with the spec the other finders give."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisterAfterExec(spec.loader)
                return spec
        return None


def _uninstall():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PeftImportHook)]


def _register():
    _uninstall()
    try:
        import peft_softprompt_ext  # noqa: F401  (importing it registers SOFT_PROMPT with peft)
    except Exception as err:  # a broken install must never break peft itself
        import warnings

        warnings.warn(
            f"peft-softprompt-ext could not register the SOFT_PROMPT adapter type ({type(err).__name__}: {err}); "
            f"`import peft_softprompt_ext` shows why. Set {ENV}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )


def install():
    """Called by the .pth file at start-up."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TRIGGER in sys.modules:  # peft already imported (e.g. an embedded interpreter): register now
        _register()
        return
    if not any(isinstance(f, PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())  # before the path finder that would load peft itself
