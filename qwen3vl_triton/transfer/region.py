"""The shared-memory region of the shm transport, as both sides see it.

The sender writes REGION_MAGIC and a secret of its own (32 random bytes) into the first bytes of
its region, and the table from REGION_HEADER on (page-aligned); region names are REGION_KEY (128
random bits). The language server opens a region for a sequence only once that sequence proves,
with the secret, that its sender wrote it (`SharedRegions`).
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import stat
import threading

import numpy as np

from qwen3vl_triton.errors import InputError

# The shm transport's region: REGION_MAGIC and the sender's secret (32 random bytes) in the first
# bytes, the table from REGION_HEADER on (page-aligned). Names: REGION_KEY, 128 random bits.
REGION_KEY = re.compile(r"^/qwen3vl_table_[0-9a-f]{32}$")

REGION_MAGIC = b"qwen3vl-table\x00v1"  # 16 bytes

REGION_HEADER = 4096

def new_region() -> tuple[str, str]:
    """A new region's Triton name and its shared-memory key (REGION_KEY: 128 random bits)."""
    name = f"qwen3vl_table_{secrets.token_hex(16)}"
    return name, f"/{name}"

def region_header(secret: str) -> bytes:
    """The bytes a sender writes at the start of its region: the magic, then the secret."""
    return REGION_MAGIC + bytes.fromhex(secret)



class Region:
    """One shared-memory region opened for one sequence. Rows are copied with pread into their
    place in the table: a region truncated under the reader gives a short read (an error), never
    the SIGBUS a mapping would raise."""

    def __init__(self, fd: int, key: str, secret: str, owner: "SharedRegions"):
        self.fd, self.key, self.secret, self.owner = fd, key, secret, owner
        self._lock = threading.Lock()

    def matches(self, key: str, secret: str) -> bool:
        return key == self.key and hmac.compare_digest(secret, self.secret)

    def read_into(self, dest: np.ndarray, byte_offset: int) -> None:
        need = dest.nbytes
        with self._lock:
            if self.fd < 0:
                raise InputError("chunk_region", f"region {self.key} was released")
            size = os.fstat(self.fd).st_size
            if byte_offset < 0 or byte_offset + need > size:
                raise InputError("region_offset", f"bytes [{byte_offset}, {byte_offset + need}) fall outside region "
                                                  f"{self.key} of {size} bytes")
            view = memoryview(dest.reshape(-1).view(np.uint8))  # bytes of any dtype, bfloat16 included
            done = 0
            while done < need:
                n = os.preadv(self.fd, [view[done:]], byte_offset + done)
                if n <= 0:
                    raise InputError("chunk_region", f"region {self.key} ended at byte {byte_offset + done} while "
                                                     "being read (truncated by its owner)")
                done += n

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
            self.owner._closed()

class SharedRegions:
    """System shared-memory regions of co-located senders, opened for the sequences that own them.

    A `chunk` request may name rows of a region instead of carrying them: the rows are copied
    from the region straight into the sequence's table (one copy, nothing through Triton). A
    sequence reads a region only after proving it may: the sender writes a magic and a random
    secret of its own into the region's first bytes (transfer.region_header; the table follows
    at REGION_HEADER), and every chunk request that names the region carries that secret. Region
    names alone are no proof (Triton lists registered regions to its admin, /dev/shm lists files
    to local users); a secret that only whoever wrote or can read the region knows is.

    Opened without following links and without blocking (a FIFO or device never stalls the
    model), only regular files of the server's own user, only names of this project.
    """

    SECRET = re.compile(r"^[0-9a-f]{64}$")

    def __init__(self, root: str = "/dev/shm"):
        self.root = root
        self._open = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Regions open now (each held by one sequence until it ends)."""
        return self._open

    def open(self, key: str, secret: str) -> Region:
        if not REGION_KEY.match(key):
            raise InputError("chunk_region", f"{key!r} is not a region key of this project (/qwen3vl_table_ and 32 "
                                             "hex digits)")
        if not self.SECRET.match(secret):
            raise InputError("region_secret", "must be the 64 hex digits the sender wrote into its region")
        path = os.path.join(self.root, key[1:])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InputError("chunk_region", f"no shared-memory region {key} on the language server's host: "
                                             "the shm transport needs co-located servers") from None
        except OSError:  # ELOOP: a symbolic link; EACCES: someone else's file
            raise InputError("chunk_region", f"{key} is not a regular file of the language server's user") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise InputError("chunk_region", f"{key} is not a regular file of the language server's user")
            expected = region_header(secret)
            head = os.pread(fd, len(expected), 0) if st.st_size >= REGION_HEADER else b""
            if not hmac.compare_digest(head, expected):
                raise InputError("region_secret", f"does not match region {key}: a sequence reads only a region "
                                                  "whose secret its sender wrote")
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._open += 1
        return Region(fd, key, secret, self)

    def _closed(self) -> None:
        with self._lock:
            self._open -= 1
