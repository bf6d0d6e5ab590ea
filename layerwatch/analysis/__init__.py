"""After training: checkpoints and Hub revisions probed as one run (``trajectory``, ``revisions``), a run drawn as
an HTML report (``report``), several runs compared (``compare``), and the HTML pieces they share (``html``)."""
