"""Triton's system shared memory extension, over HTTP and gRPC alike.

A client creates a POSIX shared memory object (`/dev/shm/<key>`), registers a byte range of it with the
server under a region name, then names that region in an infer request's input parameters
(`shared_memory_region`, `shared_memory_byte_size`, `shared_memory_offset`) instead of sending the tensor's
bytes, and in an output's parameters to have the result written there instead of into the response.
Tensor bytes in a region are laid out as in Triton's binary tensor data (BYTES elements: a 4-byte
little-endian length, then the bytes).

CUDA shared memory (cudaIpc handles) is not served: its status lists no region and registering one is a
clear 400, as Triton answers for an extension it lacks.

Tensor bytes move with pread/pwrite on the object's file descriptor, not through a memory map: a client that
shrinks its object after registering gets a 400 (a short read), never a SIGBUS that would kill the server.
Reads and writes happen on the event loop (as do register and unregister), so a region's descriptor is never
closed while it is read or written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from server.errors import InvalidRequest, TooLarge

SHM_DIR = "/dev/shm"
_KEY = re.compile(r"/?([^/\x00]{1,255})")

PARAM_REGION, PARAM_SIZE, PARAM_OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(frozen=True)
class Target:
    """Where a request puts one tensor: `byte_size` bytes at `offset` within the region `region`."""
    region: str
    byte_size: int
    offset: int


@dataclass
class _Region:
    name: str
    key: str
    offset: int  # within the shared memory object
    byte_size: int
    fd: int

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def _int(value, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def target(params: dict, what: str) -> Target | None:
    """The shared memory target named by a tensor's parameters (plain values), or None when it names none."""
    if PARAM_REGION not in params:
        return None
    region = params[PARAM_REGION]
    if not isinstance(region, str) or not region:
        raise InvalidRequest(f"{what}: {PARAM_REGION} must be a region name, got {region!r}")
    if PARAM_SIZE not in params:
        raise InvalidRequest(f"{what}: {PARAM_REGION} needs {PARAM_SIZE}")
    return Target(region, _int(params[PARAM_SIZE], f"{what}: {PARAM_SIZE}", 0),
                  _int(params.get(PARAM_OFFSET, 0), f"{what}: {PARAM_OFFSET}", 0))


def placed(t: Target, written: int) -> dict:
    """An output's parameters in the response once `written` bytes of it lie in its region."""
    out = {PARAM_REGION: t.region, PARAM_SIZE: written}
    if t.offset:
        out[PARAM_OFFSET] = t.offset
    return out


# Each registered region holds an open file descriptor: without a bound, a client could take every descriptor the
# process has (then no connection, HTTP or gRPC, could be accepted). perf_analyzer and tritonclient's examples
# register one region an input and an output.
MAX_REGIONS = 256
MAX_NAME = 256


class SharedMemoryRegistry:
    """The system shared memory regions registered by clients, by name (one registry for HTTP and gRPC)."""

    def __init__(self, enabled: bool = True, max_read: int | None = None):
        """max_read: most bytes one input may read from a region (server.payload_limit, as a request body)."""
        self.enabled = enabled
        self.max_read = max_read
        self._regions: dict[str, _Region] = {}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise InvalidRequest("system shared memory is turned off on this server (server.shared_memory: false); "
                                 "send tensor data in the request")

    def register(self, name, key, offset, byte_size) -> None:
        self._check_enabled()
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidRequest(f"a region name must be a string of 1 to {MAX_NAME} characters, got {name[:40]!r}"
                                 if isinstance(name, str) else f"a region name must be a string, got {name!r}")
        if not isinstance(key, str) or not (m := _KEY.fullmatch(key)) or m.group(1) in (".", ".."):
            raise InvalidRequest(f"key must name a POSIX shared memory object ('/name', no other '/'), got {key!r}")
        offset, byte_size = _int(offset, "offset", 0), _int(byte_size, "byte_size", 1)
        if name in self._regions:
            raise InvalidRequest(f"shared memory region {name!r} is already registered; unregister it first")
        if len(self._regions) >= MAX_REGIONS:
            raise InvalidRequest(f"{MAX_REGIONS} shared memory regions are registered, the most this server holds; "
                                 "unregister some first")
        try:
            fd = os.open(os.path.join(SHM_DIR, m.group(1)), os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidRequest(f"cannot open shared memory object {key!r}: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        if offset + byte_size > size:
            os.close(fd)
            raise InvalidRequest(f"region {name!r}: offset {offset} + byte_size {byte_size} runs past the "
                                 f"{size} bytes of shared memory object {key!r}")
        self._regions[name] = _Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str | None = None) -> None:
        """Unregister `name` (no error if it is not registered, as Triton), or every region when None or ''."""
        names = list(self._regions) if not name else [name] if name in self._regions else []
        for n in names:
            os.close(self._regions.pop(n).fd)

    close = unregister

    def status(self, name: str | None = None) -> list[dict]:
        if not name:
            return [r.status() for r in self._regions.values()]
        return [self._region(name).status()]

    def _region(self, name: str) -> _Region:
        region = self._regions.get(name)
        if region is None:
            raise InvalidRequest(f"unable to find system shared memory region {name!r}")
        return region

    def _span(self, t: Target, what: str) -> tuple[_Region, int]:
        """The region and the object offset where `t` starts, after checking that it fits both."""
        self._check_enabled()
        region = self._region(t.region)
        if t.offset + t.byte_size > region.byte_size:
            raise InvalidRequest(f"{what}: offset {t.offset} + byte_size {t.byte_size} runs past the "
                                 f"{region.byte_size} bytes of region {t.region!r}")
        return region, region.offset + t.offset

    @staticmethod
    def _shrunk(region: _Region, t: Target, what: str) -> InvalidRequest:
        return InvalidRequest(f"{what}: shared memory object {region.key!r} has shrunk below region {t.region!r}")

    def check(self, t: Target, what: str) -> None:
        """Fail now (before any work) if `t` does not lie within a registered region."""
        self._span(t, what)

    def read(self, t: Target, what: str) -> bytes:
        if self.max_read is not None and t.byte_size > self.max_read:  # as a body over payload_limit
            raise TooLarge(f"{what}: {t.byte_size} bytes in shared memory, over the {self.max_read}-byte payload limit")
        region, start = self._span(t, what)
        data = os.pread(region.fd, t.byte_size, start)
        if len(data) != t.byte_size:
            raise self._shrunk(region, t, what)
        return data

    def write(self, t: Target, data: bytes, what: str) -> dict:
        """Write an output's bytes to its target; the output's response parameters."""
        if len(data) > t.byte_size:
            raise InvalidRequest(f"{what}: needs {len(data)} bytes, shared memory target holds {t.byte_size}")
        region, start = self._span(t, what)
        if start + len(data) > os.fstat(region.fd).st_size:  # pwrite would grow it back: the client sees nothing
            raise self._shrunk(region, t, what)
        os.pwrite(region.fd, data, start)
        return placed(t, len(data))


def cuda_refused() -> InvalidRequest:
    return InvalidRequest("CUDA shared memory is not supported by this server; use system shared memory "
                          "(/v2/systemsharedmemory) or binary tensor data")
