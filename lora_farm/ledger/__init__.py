"""The Redis job ledger: records (store.py), key template (keys.py), checked transitions."""

from lora_farm.ledger.keys import Keys
from lora_farm.ledger.record import JobRecord
from lora_farm.ledger.store import Created, Ledger, NewJob

__all__ = ["Created", "JobRecord", "Keys", "Ledger", "NewJob"]
