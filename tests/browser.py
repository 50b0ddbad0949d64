"""The one way tests and benchmarks start a browser: Debian's chromium (/usr/bin/chromium) through Playwright,
without its sandbox only when running as root (chromium refuses to start sandboxed as root)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Final

from playwright.async_api import Browser, async_playwright

CHROMIUM: Final = "/usr/bin/chromium"


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM,
                                           args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield browser
        finally:
            await browser.close()
