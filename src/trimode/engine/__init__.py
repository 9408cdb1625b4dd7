"""The serving engine: config, auto policy, scheduler, KV pool, model runner, async front end."""
