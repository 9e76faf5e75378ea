"""The messages and services of Text Embeddings Inference's gRPC API (package `tei.v1`), built at import from the
table below (field names, numbers and types as TEI's proto declares them, so a client generated from TEI's
`tei.proto` talks to this server unmodified). No protoc step: the table is turned into a FileDescriptorProto and
the message classes come from protobuf's message factory. server/grpc_tei.py serves them."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tei.v1"
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64,
            "float": _F.TYPE_FLOAT}
ENUMS = {
    "ModelType": ["MODEL_TYPE_EMBEDDING", "MODEL_TYPE_CLASSIFIER", "MODEL_TYPE_RERANKER"],
    "TruncationDirection": ["TRUNCATION_DIRECTION_RIGHT", "TRUNCATION_DIRECTION_LEFT"],
}
# message -> [(field, number, type, label)]; type: a scalar above, an enum or another message; label: "" (singular),
# "repeated" or "optional" (proto3 optional: presence is tracked).
MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "InfoRequest": [],
    "InfoResponse": [("version", 1, "string", ""), ("sha", 2, "string", "optional"), ("docker_label", 3, "string", "optional"),
                     ("model_id", 4, "string", ""), ("model_sha", 5, "string", "optional"), ("model_dtype", 6, "string", ""),
                     ("model_type", 7, "ModelType", ""), ("max_concurrent_requests", 8, "uint32", ""),
                     ("max_input_length", 9, "uint32", ""), ("max_batch_tokens", 10, "uint32", ""),
                     ("max_batch_requests", 11, "uint32", "optional"), ("max_client_batch_size", 12, "uint32", ""),
                     ("tokenization_workers", 13, "uint32", "")],
    "Metadata": [("compute_chars", 1, "uint32", ""), ("compute_tokens", 2, "uint32", ""), ("total_time_ns", 3, "uint64", ""),
                 ("tokenization_time_ns", 4, "uint64", ""), ("queue_time_ns", 5, "uint64", ""),
                 ("inference_time_ns", 6, "uint64", "")],
    "EmbedRequest": [("inputs", 1, "string", ""), ("truncate", 2, "bool", ""), ("normalize", 3, "bool", ""),
                     ("truncation_direction", 4, "TruncationDirection", ""), ("prompt_name", 5, "string", "optional")],
    "EmbedResponse": [("embeddings", 1, "float", "repeated"), ("metadata", 2, "Metadata", "")],
    "EmbedSparseRequest": [("inputs", 1, "string", ""), ("truncate", 2, "bool", ""),
                           ("truncation_direction", 3, "TruncationDirection", ""), ("prompt_name", 4, "string", "optional")],
    "SparseValue": [("index", 1, "uint32", ""), ("value", 2, "float", "")],
    "EmbedSparseResponse": [("sparse_embeddings", 1, "SparseValue", "repeated"), ("metadata", 2, "Metadata", "")],
    "EmbedAllRequest": [("inputs", 1, "string", ""), ("truncate", 2, "bool", ""),
                        ("truncation_direction", 3, "TruncationDirection", ""), ("prompt_name", 4, "string", "optional")],
    "TokenEmbedding": [("embeddings", 1, "float", "repeated")],
    "EmbedAllResponse": [("token_embeddings", 1, "TokenEmbedding", "repeated"), ("metadata", 2, "Metadata", "")],
    "PredictRequest": [("inputs", 1, "string", ""), ("truncate", 2, "bool", ""), ("raw_scores", 3, "bool", ""),
                       ("truncation_direction", 4, "TruncationDirection", "")],
    "PredictPairRequest": [("inputs", 1, "string", "repeated"), ("truncate", 2, "bool", ""), ("raw_scores", 3, "bool", ""),
                           ("truncation_direction", 4, "TruncationDirection", "")],
    "Prediction": [("score", 1, "float", ""), ("label", 2, "string", "")],
    "PredictResponse": [("predictions", 1, "Prediction", "repeated"), ("metadata", 2, "Metadata", "")],
    "RerankRequest": [("query", 1, "string", ""), ("texts", 2, "string", "repeated"), ("truncate", 3, "bool", ""),
                      ("raw_scores", 4, "bool", ""), ("return_text", 5, "bool", ""),
                      ("truncation_direction", 6, "TruncationDirection", "")],
    "RerankStreamRequest": [("query", 1, "string", ""), ("text", 2, "string", ""), ("truncate", 3, "bool", ""),
                            ("raw_scores", 4, "bool", ""), ("return_text", 5, "bool", ""),
                            ("truncation_direction", 6, "TruncationDirection", "")],
    "Rank": [("index", 1, "uint32", ""), ("text", 2, "string", "optional"), ("score", 3, "float", "")],
    "RerankResponse": [("ranks", 1, "Rank", "repeated"), ("metadata", 2, "Metadata", "")],
    "EncodeRequest": [("inputs", 1, "string", ""), ("add_special_tokens", 2, "bool", ""), ("prompt_name", 3, "string", "optional")],
    "SimpleToken": [("id", 1, "uint32", ""), ("text", 2, "string", ""), ("special", 3, "bool", ""),
                    ("start", 4, "uint32", "optional"), ("stop", 5, "uint32", "optional")],
    "EncodeResponse": [("tokens", 1, "SimpleToken", "repeated")],
    "DecodeRequest": [("ids", 1, "uint32", "repeated"), ("skip_special_tokens", 2, "bool", "")],
    "DecodeResponse": [("text", 1, "string", "")],
}
# service -> [(method, request, response, client streams, server streams)]
SERVICES: dict[str, list[tuple[str, str, str, bool, bool]]] = {
    "Info": [("Info", "InfoRequest", "InfoResponse", False, False)],
    "Embed": [("Embed", "EmbedRequest", "EmbedResponse", False, False),
              ("EmbedStream", "EmbedRequest", "EmbedResponse", True, True),
              ("EmbedSparse", "EmbedSparseRequest", "EmbedSparseResponse", False, False),
              ("EmbedSparseStream", "EmbedSparseRequest", "EmbedSparseResponse", True, True),
              ("EmbedAll", "EmbedAllRequest", "EmbedAllResponse", False, False),
              ("EmbedAllStream", "EmbedAllRequest", "EmbedAllResponse", True, True)],
    "Predict": [("Predict", "PredictRequest", "PredictResponse", False, False),
                ("PredictPair", "PredictPairRequest", "PredictResponse", False, False),
                ("PredictStream", "PredictRequest", "PredictResponse", True, True),
                ("PredictPairStream", "PredictPairRequest", "PredictResponse", True, True)],
    "Rerank": [("Rerank", "RerankRequest", "RerankResponse", False, False),
               ("RerankStream", "RerankStreamRequest", "RerankResponse", True, False)],
    "Tokenize": [("Tokenize", "EncodeRequest", "EncodeResponse", False, False),
                 ("TokenizeStream", "EncodeRequest", "EncodeResponse", True, True),
                 ("Decode", "DecodeRequest", "DecodeResponse", False, False),
                 ("DecodeStream", "DecodeRequest", "DecodeResponse", True, True)],
}


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="tei.proto", package=PACKAGE, syntax="proto3")
    for name, values in ENUMS.items():
        enum = f.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in MESSAGES.items():
        message = f.message_type.add(name=name)
        for field, number, kind, label in fields:
            proto = message.field.add(name=field, number=number, json_name=field,
                                      label=_F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL)
            if kind in _SCALARS:
                proto.type = _SCALARS[kind]
            else:
                proto.type = _F.TYPE_ENUM if kind in ENUMS else _F.TYPE_MESSAGE
                proto.type_name = f".{PACKAGE}.{kind}"
            if label == "optional":  # proto3 optional: a synthetic one-field oneof
                proto.proto3_optional = True
                proto.oneof_index = len(message.oneof_decl)
                message.oneof_decl.add(name=f"_{field}")
    for name, methods in SERVICES.items():
        service = f.service.add(name=name)
        for method, request, response, client_streams, server_streams in methods:
            service.method.add(name=method, input_type=f".{PACKAGE}.{request}", output_type=f".{PACKAGE}.{response}",
                               client_streaming=client_streams, server_streaming=server_streams)
    return f


_pool = descriptor_pool.DescriptorPool()
_pool.Add(_file())
messages = {name: message_factory.GetMessageClass(_pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in MESSAGES}
