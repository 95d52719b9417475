"""The report's "rejected" column says why in numbers: a candidate faster by less than
``min_speedup`` is not called slower, and an error names the result that failed."""

from ryzen_opt.optimization.report import CandidateResult, CaseResult, SiteReport, _rejections


def _site(*cands):
    return SiteReport(
        "(training step)", "loss head", "", [CaseResult("train step", "4x8", list(cands))]
    )


def _cand(name, status, **kw):
    c = CandidateResult(name, "op", status)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_rejection_reasons_say_what_the_numbers_were():
    why = _rejections(
        _site(
            _cand("a", "slower", speedup=0.9, ci=(0.8, 0.95)),
            _cand(
                "b",
                "slower",
                speedup=1.03,
                ci=(1.01, 1.05),
                detail="1.03x, CI [1.01, 1.05] (needs CI > 1 and >= 1.05x)",
            ),
            _cand("c", "error", rel_error=0.047, detail="grad w: relative error 4.74e-02 > 0.047"),
        ),
        "train step",
    )
    assert "a: slower 0.90x" in why
    assert "b: not fast enough: 1.03x" in why and "slower 1.03x" not in why
    assert "c: error 4.7e-02 (grad w: relative error 4.74e-02 > 0.047)" in why
