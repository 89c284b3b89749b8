"""captioner: a small, fast CNN+LSTM image captioner with a step-by-step decoding stream."""
from .config import CaptionerConfig
from .generation import GenerationConfig
from .hub import ModelLoadError
from .loading import example, load_model
from .model import AttendDecoder, Captioner, Decoder, Encoder, ImageFeatures, ShowTellDecoder
from .preprocess import ImageError, open_image, preprocess
from .vocab import Vocabulary

__all__ = ["CaptionerConfig", "GenerationConfig", "Vocabulary", "Captioner", "Decoder", "ShowTellDecoder", "AttendDecoder", "Encoder", "ImageFeatures",
           "ModelLoadError", "load_model", "example", "ImageError", "open_image", "preprocess"]
__version__ = "0.1.0"
