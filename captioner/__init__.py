"""captioner: a small, fast CNN+LSTM image captioner with a step-by-step decoding stream."""
from .config import CaptionerConfig
from .vocab import Vocabulary
from .model import Captioner, Decoder, Encoder
from .hub import ModelLoadError, load
from .preprocess import ImageError, open_image, preprocess

__all__ = ["CaptionerConfig", "Vocabulary", "Captioner", "Decoder", "Encoder", "ModelLoadError", "load", "ImageError", "open_image", "preprocess"]
__version__ = "0.1.0"
