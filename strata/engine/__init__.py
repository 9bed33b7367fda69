"""The engine: requests, sampling, scheduler, KV blocks, model runner, and the step loop."""
