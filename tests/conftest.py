"""Shared test setup."""

import pytest

from copd.capabilities import visual


@pytest.fixture(autouse=True, scope="session")
def _media_cache_in_tmp(tmp_path_factory):
    # Built-in image and video tasks write their files under media_dir (default: the user's
    # ~/.cache); tests that take the default must not touch the home folder.
    folder = str(tmp_path_factory.mktemp("media"))
    with pytest.MonkeyPatch.context() as patch:
        for defaults in (visual.SHAPES_DEFAULTS, visual.MOTION_DEFAULTS):
            patch.setitem(defaults, "media_dir", folder)
        yield
