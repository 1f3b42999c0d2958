"""Generated gRPC and protobuf modules for `proto/chasqui.proto` (run `make proto`).

The only code shared by `chasqui_node` and `chasqui_client`.
"""
