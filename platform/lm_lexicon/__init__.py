"""lm_lexicon: definition modeling the LM-Lexicon way (Split-then-Merge), on Ray.

Importing the package is cheap: heavy dependencies (torch, ray, transformers) are imported by the modules that use them.
"""
__version__ = "0.1.0"
