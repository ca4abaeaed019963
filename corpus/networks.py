"""Third-party architectures built from their public configurations with seeded random weights
(no download): a BERT-style encoder and a ViT image classifier from `transformers`, and Keras
applications (`weights=None`). Each is a factory enginekit exports like a user's own."""

from __future__ import annotations

SEED = 0
BERT_VOCAB = 30522  # the uncased WordPiece vocabulary the corpus's sentences are tokenized with
BERT_MAX_POSITIONS = 128


def bert_encoder():
    """A small BERT (2 layers, hidden 128): token ids and mask in, per-token states and pooled out."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=BERT_VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=BERT_MAX_POSITIONS)
    model = BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            output = self.bert(input_ids=input_ids, attention_mask=attention_mask)
            return output.last_hidden_state, output.pooler_output

    return Encoder().eval()


def vit_classifier():
    """A small ViT (64 x 64 images, 8 x 8 patches, 4 layers, 100 classes): pixels in, logits out."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=256, num_labels=100)
    model = ViTForImageClassification(config).eval()

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = model

        def forward(self, pixel_values):
            return self.vit(pixel_values=pixel_values).logits

    return Classifier().eval()


def mobilenet_v3_small():
    """Keras MobileNetV3Small (its Rescaling preprocessing layer included): 0..255 RGB in."""
    import keras

    keras.utils.set_random_seed(SEED)
    return keras.applications.MobileNetV3Small(weights=None, input_shape=(128, 128, 3), classes=100)


def resnet50():
    """Keras ResNet50 at 96 x 96 (caffe-style BGR, mean-subtracted input)."""
    import keras

    keras.utils.set_random_seed(SEED)
    return keras.applications.ResNet50(weights=None, input_shape=(96, 96, 3), classes=100)


def efficientnet_b0():
    """Keras EfficientNetB0 at 64 x 64, with its Rescaling and Normalization layers: 0..255 in."""
    import keras

    keras.utils.set_random_seed(SEED)
    return keras.applications.EfficientNetB0(weights=None, input_shape=(64, 64, 3), classes=10)
