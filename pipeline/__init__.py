"""sift-pretrain: BERT masked-LM pretraining on DeepSpeed with SIFT sample selection."""

__version__ = "0.1.0"
