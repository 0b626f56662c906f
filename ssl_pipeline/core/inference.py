"""Forward passes without gradients, in large slices, for validation, testing and embeddings."""
import torch

from ssl_pipeline.core.data import batched

INFERENCE_BATCH = 1024


def predict(model, images, normalize, runtime) -> torch.Tensor:
    """uint8 images (N, C, H, W) on the device -> predicted class per image (N,)."""
    model.eval()
    with runtime.autocast():
        return batched(lambda chunk: model(normalize(chunk)).argmax(dim=1), images, INFERENCE_BATCH)


def accuracy(model, images, labels, normalize, runtime) -> float:
    return (predict(model, images, normalize, runtime) == labels).float().mean().item()


def embed(encoder, images, normalize, runtime) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> encoder features (N, F) in float32."""
    encoder.eval()
    with runtime.autocast():
        return batched(lambda chunk: encoder(normalize(chunk)).float(), images, INFERENCE_BATCH)
