"""The ``celery -A lora_farm.workers.app`` target (workers, Flower, `inspect`): the one module that
builds a Celery app when imported. Nothing in lora_farm imports it; the tasks attach themselves
(``shared_task`` in tasks.py), and senders build their own (``broker.sending_app``).
"""

from lora_farm.settings import get_settings
from lora_farm.workers.broker import make_app

app = make_app(get_settings())
