"""Triton's gRPC extensions beyond KServe v2, for the servicer in server/grpc_kserve.py: streaming inference,
system shared memory (CUDA shared memory refused clearly) and the model repository, answered by the functions the
HTTP routes use (server/routes_triton.py, server/shared_memory.py)."""

from __future__ import annotations

import asyncio
import logging

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidRequest, kind_of
from server.grpc_common import CODES, bool_param, call_metadata, call_peer, call_timing
from server.routes_triton import repository_index, repository_load, repository_unload
from server.shared_memory import cuda_refused

log = logging.getLogger(__name__)


class TritonExtensions:
    """A mixin of the servicer: `self.app`, `self._answer(rpc, context, work)`, `self._infer`, `self._check_key`
    and `self._record` are the servicer's."""

    async def ModelStreamInfer(self, request_iterator, context):
        """Triton's streaming inference (tritonclient's start_stream / async_stream_infer, perf_analyzer
        --streaming): each request on the stream is answered by one message, as soon as it is done (clients match
        them by id), so a stream's requests run concurrently and batch together. A failed request is its message's
        error_message and the stream goes on; the client closing the stream drops what is still queued. At most
        `stream_window` requests are in hand (read, not yet answered to the client): the stream is not read past it."""
        metadata, peer = call_metadata(context), call_peer(context)
        try:
            self._check_key(metadata)
        except Exception as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        answers: asyncio.Queue = asyncio.Queue()
        running: set[asyncio.Task] = set()
        window = asyncio.Semaphore(self.stream_window)

        async def one(request) -> None:
            timing, code = call_timing(metadata), grpc.StatusCode.OK
            try:
                # must be a bool, as Triton checks it; its value changes nothing (every answer is its request's last)
                bool_param(request.parameters, "triton_enable_empty_final_response")
                message = pb.ModelStreamInferResponse(infer_response=await self._infer(request, metadata, timing, context))
            except asyncio.CancelledError:  # the client closed the stream: recorded as the unary call's cancellation
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                kind = kind_of(exc)
                if kind is None:
                    log.exception("unhandled error in gRPC ModelStreamInfer (request id %s)", timing.request_id)
                    code, text = grpc.StatusCode.INTERNAL, f"internal error (request id {timing.request_id})"
                else:
                    code, text = CODES.get(kind.status, grpc.StatusCode.INTERNAL), str(exc)
                message = pb.ModelStreamInferResponse(
                    error_message=text, infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))
            finally:
                self._record("ModelStreamInfer", code, timing, metadata, peer)
            # as Triton: a model that is not decoupled answers a request with one message, its last
            # (clients that pass enable_empty_final_response=True wait for this flag, answers and errors alike)
            message.infer_response.parameters["triton_final_response"].bool_param = True
            await answers.put(message)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()  # released once its answer went to the client
                    task = asyncio.ensure_future(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (message := await answers.get()) is not None:
                yield message
                window.release()
        finally:  # the stream ended or was cancelled: whatever still runs is not wanted
            reader.cancel()
            for task in list(running):
                task.cancel()

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

    async def LogSettings(self, request, context):
        await self._unimplemented("LogSettings", context, "Triton's logging extension")

    async def TraceSetting(self, request, context):
        await self._unimplemented("TraceSetting", context, "Triton's trace extension")

    async def _unimplemented(self, rpc: str, context, what: str) -> None:
        """UNIMPLEMENTED, counted and logged as any call (grpcio's default logged a traceback at ERROR each time)."""
        metadata = call_metadata(context)
        self._record(rpc, grpc.StatusCode.UNIMPLEMENTED, call_timing(metadata), metadata, call_peer(context))
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by this server")
