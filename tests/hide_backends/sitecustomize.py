"""On PYTHONPATH, hides the model backends' packages, as on an install without the model extras."""
import importlib.abc
import sys

HIDDEN = {"llama_cpp", "torch", "transformers", "accelerate", "bitsandbytes", "httpx"}


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
        return None


sys.meta_path.insert(0, _Hide())
