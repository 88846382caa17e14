"""loraplane: serve hundreds of LoRA adapters on one shared base model."""

from loraplane.client import AsyncClient, Client
from loraplane.errors import LoraplaneError

__all__ = ["AsyncClient", "Client", "LoraplaneError"]
