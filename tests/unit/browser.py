"""Test support for the update page: Debian's headless Chromium driven by selenium through
chromedriver, and a page object that finds the page's parts by id and keeps screenshots."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # As root (here and in CI) Chromium needs --no-sandbox; /dev/shm may be small in containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=DriverService(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The update page at `url` in `driver`; screenshots go to `shots`, their paths to `say`."""

    def __init__(self, driver: webdriver.Chrome, url: str, shots: Path, say: Callable[[str], None] = print) -> None:
        self.driver, self.url, self.shots, self.say = driver, url, shots, say
        shots.mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        self.driver.get(self.url)

    def el(self, id_: str) -> WebElement:
        return self.driver.find_element(By.ID, id_)

    def text(self, id_: str) -> str:
        return self.el(id_).text

    def state(self) -> str | None:
        return self.el("state").get_attribute("data-state")

    def until(self, what: Callable[[], object], timeout: float = 30) -> None:
        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: what())

    def sign_in(self, token: str) -> None:
        self.until(lambda: self.el("access").is_displayed())
        field = self.el("token")
        field.clear()
        field.send_keys(token)
        self.el("token-save").click()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.say(f"screenshot: {path}")
        return path
