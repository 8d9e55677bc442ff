"""Job specs: what to train (pydantic models), how YAML becomes one, and its checks."""

from lora_farm.jobs.spec import ImageJobSpec, JobSpec, LlmJobSpec, VideoJobSpec, spec_from_dict

__all__ = ["ImageJobSpec", "JobSpec", "LlmJobSpec", "VideoJobSpec", "spec_from_dict"]
