"""``emajax guard``: the safety net around a customer's fine-tune (issue 27).

A job (customer chat data + base model + policy) is screened (``screen``), trained with the policy's
defense beside a self-distilled control (``pipeline``), gated on every registered judge-free EM metric,
job vs control with CIs (``metrics``, ``decision``) and decided (``report``: decision.json, report.md,
report.html, release/). ``spec`` reads job and policy files; ``store`` is the SQLite job store and worker.
"""
