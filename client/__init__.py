"""Python client for the Qwen3-VL-MoE Triton server: gRPC and HTTP, streaming, statistics.

    from client import Client
    with Client("127.0.0.1:8001", protocol="grpc") as c:
        for piece in c.generate("Describe this image.", images=[open("cat.png", "rb").read()], max_tokens=64):
            print(piece, end="", flush=True)
"""

from .api import Client, ClientError, Conversation, GenerationStats, encode_image_b64

__all__ = ["Client", "ClientError", "Conversation", "GenerationStats", "encode_image_b64"]
