import pytest


@pytest.fixture(scope="session")
def draw_figures():
    """``draw(db) -> ({figure key: live matplotlib figure}, report)``: every figure of a grid's report,
    captured before it is rendered and closed."""
    from phalanx.report import build, plots
    from phalanx.store import Store

    def draw(db):
        live, real = [], plots._png

        def keep(fig):
            fig.canvas.draw()
            live.append(fig)
            return real(fig)

        rep = build(db)
        plots._png = keep
        try:
            with Store(db) as store:
                out = plots.all_figures(rep.results, rep.rows, store)
        finally:
            plots._png = real
        return {f.key: fig for f, fig in zip([f for f in out if f.png is not None], live)}, rep

    return draw
