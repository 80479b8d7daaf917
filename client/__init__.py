"""Python client for the Qwen3-VL-MoE Triton server: gRPC and HTTP, streaming, statistics.

    from client import SAMPLE_IMAGE, Client
    with Client("127.0.0.1:8001", protocol="grpc") as c:
        for piece in c.generate("Describe this image.", images=[SAMPLE_IMAGE.read_bytes()], max_tokens=64):
            print(piece, end="", flush=True)

`SAMPLE_IMAGE` is the bundled picture (client/assets/sample.png), installed with the package.
"""

from pathlib import Path

from .api import Client, ClientError, Conversation, GenerationStats, encode_image_b64

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"

__all__ = ["SAMPLE_IMAGE", "Client", "ClientError", "Conversation", "GenerationStats", "encode_image_b64"]
