"""The Open Inference Protocol over gRPC (KServe's ``inference.GRPCInferenceService`` and the Triton RPCs its
clients call), on its own port, in the same process and event loop as the HTTP server, over the same engine.

Needs the ``grpc`` extra (grpcio, protobuf); without it the service serves HTTP only.
"""
