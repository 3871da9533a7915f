"""The README's picture of `sds3d app`: generate PROMPT in the page (headless Chromium), then save a
screenshot of the page with its result.   python scripts/app_screenshot.py [PROMPT] [STEPS] [OUT.png]"""

import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from sds3d.app import Studio, serve

prompt, steps, out = (sys.argv[1:] + ["a blue torus", "800", "docs/app.png"][len(sys.argv) - 1 :])[:3]
demo, url = serve(Studio(tempfile.mkdtemp(prefix="sds3d-app-")), port=7869, block=False)
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for arg in ("--headless=new", "--no-sandbox", "--window-size=1400,1150", "--use-angle=swiftshader",
            "--enable-unsafe-swiftshader", "--hide-scrollbars"):  # fmt: skip
    opts.add_argument(arg)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.get(url)
    time.sleep(3)
    find = lambda css: driver.find_element(By.CSS_SELECTOR, css)
    box = find("#prompt textarea, #prompt input")
    box.clear()
    box.send_keys(prompt)
    field = find("#steps input")
    field.clear()
    field.send_keys(steps)
    find("#generate").click()
    while not find("#status").text.startswith(("done", "error")):
        time.sleep(1)
    print(find("#status").text)
    time.sleep(8)  # the 3D view draws
    driver.save_screenshot(out)
    print("wrote", out)
finally:
    driver.quit()
    demo.close()
