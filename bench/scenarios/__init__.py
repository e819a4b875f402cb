"""Load scenarios: each module has `async def run(ctx) -> dict` (the report's `result`)."""
