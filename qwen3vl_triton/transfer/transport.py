"""How a table's rows travel from the encoder server to the language server: one small interface,
three implementations, each made once and reused by every request of its sender.

- `GrpcTransport`: the rows travel as binary tensor payloads in the chunk requests (remote servers);
- `ShmTransport`: co-located servers; one system shared-memory region, created once: the encoder
  writes `prompt_embedding_table` straight into it (a Triton-registered output region, registered
  with the admin key) and the language server copies each chunk's rows out of it into the sequence
  state (the chunk request names the region, the rows, and the secret the sender wrote into the
  region's header, which proves the sequence may read it: transfer/region.py), so no table byte
  passes through the sender or through Triton's request path;
- `CudaShmTransport`: a CUDA shared-memory region registered with both servers, on a GPU host.

A shared-memory transport holds one request's table at a time, from the encode to the last
acknowledged chunk: `hold()` is that span's lock.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from qwen3vl_triton.clients.grpc_stream import infer_input
from qwen3vl_triton.errors import message_of
from qwen3vl_triton.serve import admin
from qwen3vl_triton.transfer.region import REGION_HEADER, new_region, region_header


class TransportError(RuntimeError):
    """Registering a transport's region failed."""


class Transport:
    """Where the encoder writes the table and how chunk requests carry rows [start, start + count)."""

    name = "grpc"
    table_in_response = True  # the encoder returns the table in its response (else: in a region)

    def attach(self, encoder, language) -> None:
        """Register with the servers (tritonclient gRPC clients; `language` None: it is the encoder)."""

    def table_output(self, output) -> None:
        """Point the encoder's `prompt_embedding_table` output (an InferRequestedOutput) at the region
        the table goes to; the gRPC transport leaves it in the response."""

    def chunk_inputs(self, enc, start: int, count: int) -> list:
        """The chunk request inputs that carry rows [start, start + count) of `enc`'s table."""
        raise NotImplementedError

    def hold(self):
        """A lock over one request's table from its encode to its last acknowledged chunk."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Unregister and free what `attach` made."""


class GrpcTransport(Transport):
    name = "grpc"

    def chunk_inputs(self, enc, start: int, count: int) -> list:
        return [infer_input("chunk", enc.table[start:start + count][None])]


class _Region(Transport):
    """A shared-memory region registered with some servers (with their admin key)."""

    table_in_response = False

    def __init__(self, nbytes: int = 64 * 2**20, admin_key: str | None = None):
        self.region_bytes, self._admin_key = nbytes, admin_key
        self.region, self.key = new_region()  # Triton's region name, and its /dev/shm key
        self.table_offset = 0
        self._handle = None
        self._servers: list = []  # where it is registered
        self._lock = threading.Lock()

    @property
    def _admin(self) -> dict:
        return admin.grpc_headers(self._admin_key or admin.default_key())

    def hold(self):
        return self._lock

    def attach(self, encoder, language) -> None:
        if encoder is None:
            raise ValueError("shared-memory transports need the encoder server's url to register the region")
        role = None
        try:
            self._create()
            for server in self._registered_on(encoder, language):
                role = "the encoder server" if server is encoder else "the language server"
                self._register(server)
                self._servers.append(server)
        except Exception as exc:
            self.close()
            message = message_of(exc)
            if role is not None and "restricted, expecting header" in message:
                # Triton answers a wrong key as it answers a missing one; a key was always sent
                raise TransportError(f"registering the {self.name} region failed: "
                                     f"{admin.refused(role, self._admin_key)}") from None
            raise TransportError(f"registering the {self.name} region failed: {message}") from None

    def table_output(self, output) -> None:
        output.set_shared_memory(self.region, self.region_bytes - self.table_offset, offset=self.table_offset)

    def close(self) -> None:
        for server in self._servers:
            try:
                self._unregister(server)
            except Exception:  # noqa: BLE001 -- the server may already be gone
                pass
        self._servers = []
        if self._handle is not None:
            self._destroy()
            self._handle = None


class ShmTransport(_Region):
    """System shared memory: only the encoder writes through Triton; the language server reads the
    region itself, after the secret in its header (transfer/region.py) proves a sequence may."""

    name = "shm"

    def __init__(self, nbytes: int = 64 * 2**20, admin_key: str | None = None):
        import secrets

        super().__init__(nbytes, admin_key)
        self.secret = secrets.token_hex(32)
        self.table_offset = REGION_HEADER

    def _registered_on(self, encoder, language):
        return [encoder]

    def _create(self) -> None:
        import tritonclient.utils.shared_memory as shm

        # create_only: a file already there under this name is someone else's, never reused
        self._handle = shm.create_shared_memory_region(self.region, self.key, self.region_bytes, create_only=True)
        shm.set_shared_memory_region(self._handle, [np.frombuffer(region_header(self.secret), np.uint8)])

    def _register(self, server) -> None:
        server.register_system_shared_memory(self.region, self.key, self.region_bytes, headers=self._admin)

    def _unregister(self, server) -> None:
        server.unregister_system_shared_memory(self.region, headers=self._admin)

    def _destroy(self) -> None:
        import tritonclient.utils.shared_memory as shm

        shm.destroy_shared_memory_region(self._handle)

    def write_rows(self, table: np.ndarray) -> None:
        """Put `table` where the encoder writes one (benchmarks that move a table of their own)."""
        import tritonclient.utils.shared_memory as shm

        shm.set_shared_memory_region(self._handle, [table], offset=self.table_offset)

    def read_rows(self, enc) -> np.ndarray:
        """`enc`'s table as it lies in the region (checks that read it back)."""
        import tritonclient.utils.shared_memory as shm

        return shm.get_contents_as_numpy(self._handle, enc.dtype, [enc.rows, enc.hidden], offset=self.table_offset)

    def chunk_inputs(self, enc, start: int, count: int) -> list:
        row_bytes = enc.hidden * enc.dtype.itemsize
        return [infer_input("chunk_region", np.array([[self.key.encode()]], dtype=np.object_)),
                infer_input("region_secret", np.array([[self.secret.encode()]], dtype=np.object_)),
                infer_input("region_offset", np.array([[self.table_offset + start * row_bytes]], np.int64)),
                infer_input("chunk_rows", np.array([[count]], np.int32))]


class CudaShmTransport(_Region):
    """CUDA shared memory registered with both servers: the chunk inputs point into it."""

    name = "cuda_shm"

    def __init__(self, nbytes: int = 64 * 2**20, admin_key: str | None = None, device: int = 0):
        super().__init__(nbytes, admin_key)
        self.device, self.key = device, None  # a CUDA region has no /dev/shm key

    def _registered_on(self, encoder, language):
        return [encoder] + ([language] if language is not None else [])

    def _create(self) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm

        self._handle = cudashm.create_shared_memory_region(self.region, self.region_bytes, self.device)

    def _register(self, server) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm

        server.register_cuda_shared_memory(self.region, cudashm.get_raw_handle(self._handle), self.device,
                                           self.region_bytes, headers=self._admin)

    def _unregister(self, server) -> None:
        server.unregister_cuda_shared_memory(self.region, headers=self._admin)

    def _destroy(self) -> None:
        import tritonclient.utils.cuda_shared_memory as cudashm

        cudashm.destroy_shared_memory_region(self._handle)

    def read_rows(self, enc) -> np.ndarray:
        """`enc`'s table as it lies in the region (checks that read it back)."""
        import tritonclient.utils.cuda_shared_memory as cudashm

        return cudashm.get_contents_as_numpy(self._handle, enc.dtype, [enc.rows, enc.hidden])

    def chunk_inputs(self, enc, start: int, count: int) -> list:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        row_bytes = enc.hidden * enc.dtype.itemsize
        t = grpcclient.InferInput("chunk", [1, count, enc.hidden], np_to_triton_dtype(enc.dtype))
        t.set_shared_memory(self.region, count * row_bytes, offset=start * row_bytes)
        return [t]


def make_transport(kind: "str | Transport", region_bytes: int = 64 * 2**20, admin_key: str | None = None,
                   cuda_device: int = 0) -> Transport:
    """A transport by name ("grpc", "shm", "cuda_shm"), or `kind` itself when it is one already."""
    if isinstance(kind, Transport):
        return kind
    if kind == "grpc":
        return GrpcTransport()
    if kind == "shm":
        return ShmTransport(region_bytes, admin_key)
    if kind == "cuda_shm":
        return CudaShmTransport(region_bytes, admin_key, cuda_device)
    raise ValueError(f"transport must be grpc, shm or cuda_shm, got {kind!r}")
