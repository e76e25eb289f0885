"""Hugging Face-compatible UniSpeech model layer; the hot spots run unispeech_kernels ops."""
from .alignment import align
from .configuration import UniSpeechConfig
from .heads import UniSpeechForCTC, UniSpeechForPreTraining, UniSpeechForSequenceClassification
from .modeling import UniSpeechModel, UniSpeechPreTrainedModel
from .processing import UniSpeechCTCTokenizer, UniSpeechFeatureExtractor, UniSpeechProcessor

__all__ = ["UniSpeechConfig", "UniSpeechModel", "UniSpeechForCTC", "UniSpeechForSequenceClassification",
           "UniSpeechForPreTraining", "UniSpeechPreTrainedModel", "UniSpeechFeatureExtractor",
           "UniSpeechCTCTokenizer", "UniSpeechProcessor", "align"]
