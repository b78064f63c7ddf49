"""Helpers of scripts/test-real-vllm.sh: a tiny local model, an OTLP dump receiver, a load driver.

They run in two environments: build_model.py in the vLLM venv (it needs torch and transformers),
the others in either (standard library, plus opentelemetry-proto/grpcio for the receiver).
"""
