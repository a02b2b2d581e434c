"""lm_lexicon: definition modeling the LM-Lexicon way (Split-then-Merge), on Ray.

Importing the package is cheap: heavy dependencies (torch, ray, transformers) are imported by the modules that use them.
"""
import os as _os

# transformers imports comet_ml whenever it is installed, and comet_ml's error tracker then reports to its servers
# from every process (Ray workers included). Offline by default: nothing leaves the machine unless Comet is configured.
_os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
_os.environ.setdefault("COMET_DISABLE_AUTO_LOGGING", "1")

__version__ = "0.1.0"

from lm_lexicon.moe.hf_registration import install as _install_moe_auto_classes  # noqa: E402

_install_moe_auto_classes()  # "lm_lexicon_moe" in AutoConfig/AutoModelForCausalLM, registered lazily (no torch import)
