"""`loraplane demo`: no network, no GPU. A small Llama made locally, three real PEFT LoRA adapters
trained on it in seconds, an embedded Redis, the control plane and a data plane, and one mixed
batch streamed to the terminal. See run.run_demo for the function API."""

from loraplane.demo.run import BASE, DemoResult, run_demo

__all__ = ["BASE", "DemoResult", "run_demo"]
