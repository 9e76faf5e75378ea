"""Triton's gRPC extensions beyond KServe v2, for the servicer in server/grpc_kserve.py: system shared memory
(CUDA shared memory refused clearly) and the model repository, answered by the functions the HTTP routes use
(server/routes_triton.py, server/shared_memory.py)."""

from __future__ import annotations

from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidRequest
from server.routes_triton import repository_index, repository_load, repository_unload
from server.shared_memory import cuda_refused


class TritonExtensions:
    """A mixin of the servicer: `self.app` and `self._answer(rpc, context, work)` are the servicer's."""

    async def SystemSharedMemoryStatus(self, request, context):
        async def work(metadata, timing):
            regions = {r["name"]: r for r in self.app.state.shared_memory.status(request.name or None)}
            return json_format.ParseDict({"regions": regions}, pb.SystemSharedMemoryStatusResponse())
        return await self._answer("SystemSharedMemoryStatus", context, work)

    async def SystemSharedMemoryRegister(self, request, context):
        async def work(metadata, timing):
            self.app.state.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()
        return await self._answer("SystemSharedMemoryRegister", context, work)

    async def SystemSharedMemoryUnregister(self, request, context):
        async def work(metadata, timing):
            self.app.state.shared_memory.unregister(request.name or None)
            return pb.SystemSharedMemoryUnregisterResponse()
        return await self._answer("SystemSharedMemoryUnregister", context, work)

    async def CudaSharedMemoryStatus(self, request, context):
        async def work(metadata, timing):
            if request.name:
                raise InvalidRequest(f"unable to find CUDA shared memory region {request.name!r}")
            return pb.CudaSharedMemoryStatusResponse()
        return await self._answer("CudaSharedMemoryStatus", context, work)

    async def CudaSharedMemoryRegister(self, request, context):
        async def work(metadata, timing):
            raise cuda_refused()
        return await self._answer("CudaSharedMemoryRegister", context, work)

    async def CudaSharedMemoryUnregister(self, request, context):
        async def work(metadata, timing):
            return pb.CudaSharedMemoryUnregisterResponse()
        return await self._answer("CudaSharedMemoryUnregister", context, work)

    async def RepositoryIndex(self, request, context):
        async def work(metadata, timing):
            return json_format.ParseDict({"models": repository_index(self)}, pb.RepositoryIndexResponse())
        return await self._answer("RepositoryIndex", context, work)

    async def RepositoryModelLoad(self, request, context):
        async def work(metadata, timing):
            repository_load(self, request.model_name)
            return pb.RepositoryModelLoadResponse()
        return await self._answer("RepositoryModelLoad", context, work)

    async def RepositoryModelUnload(self, request, context):
        async def work(metadata, timing):
            repository_unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        return await self._answer("RepositoryModelUnload", context, work)
