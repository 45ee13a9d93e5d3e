"""What a run shows while it runs (issue 47, item 9): the demo printed nothing for 59 s after its "run
directory" line on a shared machine (the first log is at step 10); the first step now says it is done."""
import json
import logging
import re

from fcmae.pretrain import run

from test_pretrain import make_cfg


def test_the_first_step_says_it_is_done_before_the_first_log_step(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fcmae"):
        run(make_cfg("trainer.max_steps=3", "trainer.log_every=10"), tmp_path)
    said = re.search(r"step 1 done in ([\d.]+) s .*logged every 10 steps \(trainer.log_every\), next at step 3",
                     caplog.text)
    assert said, caplog.text[-2000:]
    assert 0 < float(said.group(1)) < 300
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [3]  # the line is a sign of life, not another log step
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fcmae"):  # a resumed run says it too, about its own first step
        run(make_cfg("trainer.max_steps=5", "trainer.log_every=10"), tmp_path)
    assert "step 4 done in" in caplog.text
