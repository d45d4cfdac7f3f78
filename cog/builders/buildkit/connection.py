"""A gRPC connection to BuildKit's Control service: ListWorkers, Info, Solve and Status."""

from __future__ import annotations

from typing import Any

import attrs
import grpc

from cog.builders.buildkit.address import Address
from cog.builders.buildkit.pb import messages as pb
from cog.builders.buildkit.pb import method_path
from cog.builders.buildkit.tunnel import EngineTunnel

MAX_MESSAGE = 64 * 1024 * 1024


@attrs.frozen
class TLSFiles:
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None


class BuildKitConnection:
    """A gRPC channel to BuildKit's Control service (and the docker-grpc tunnel if any)."""

    def __init__(self, address: Address, tls: TLSFiles | None = None):
        self.address = address
        self.tls = tls
        self.tunnel: EngineTunnel | None = None
        self.channel: grpc.aio.Channel | None = None
        #: set by close(): a call cancelled after this was cancelled by the closing channel
        self.closed = False

    async def open(self) -> None:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        target = self.address.target
        if self.address.scheme == "docker-grpc":
            assert self.address.engine is not None
            self.tunnel = EngineTunnel(self.address.engine)
            target = await self.tunnel.start()
        if self.tls is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls.ca,
                private_key=self.tls.key,
                certificate_chain=self.tls.cert,
            )
            if self.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self.tls.server_name))
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)

    async def close(self) -> None:
        self.closed = True
        if self.channel is not None:
            await self.channel.close()  # cancels calls still running
            self.channel = None
        if self.tunnel is not None:
            await self.tunnel.close()
            self.tunnel = None

    def _call(self, method: str, request_type: Any, response_type: Any, streaming=False):
        assert self.channel is not None, "open() the connection first"
        make = self.channel.unary_stream if streaming else self.channel.unary_unary
        return make(
            method_path(method),
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    async def list_workers(self, timeout: float) -> list[Any]:
        call = self._call("ListWorkers", pb.ListWorkersRequest, pb.ListWorkersResponse)
        return list((await call(pb.ListWorkersRequest(), timeout=timeout)).record)

    async def info(self, timeout: float) -> Any | None:
        """InfoResponse, or None for a BuildKit before v0.11 (no Info call)."""
        call = self._call("Info", pb.InfoRequest, pb.InfoResponse)
        try:
            return await call(pb.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def solve(self, request: Any) -> grpc.aio.UnaryUnaryCall:
        return self._call("Solve", pb.SolveRequest, pb.SolveResponse)(request)

    def status(self, ref: str) -> grpc.aio.UnaryStreamCall:
        call = self._call("Status", pb.StatusRequest, pb.StatusResponse, streaming=True)
        return call(pb.StatusRequest(Ref=ref))
