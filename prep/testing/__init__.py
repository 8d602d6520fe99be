"""Test doubles that ship with medkd: the fault-injecting HTTP server and the tiny Qwen2 model."""
