from sqlalchemy.ext.asyncio import async_sessionmaker
from payments.database import create_engine_for
from tests.conftest import build_payment_api


async def test_explore(tmp_path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path}/missing/dir/x.db")
    out = []
    async with build_payment_api(async_sessionmaker(engine, expire_on_commit=False)) as api:
        for method, url, kw in [
            ("GET", "/api/payments/health", {}),
            ("GET", "/api/payments/status/TXN-1", {}),
            ("GET", "/api/payments/", {}),
            ("GET", "/api/payments/summary", {}),
            ("GET", "/api/payments/webhooks", {}),
            ("GET", "/api/payments/audit/TXN-1", {}),
            ("POST", "/api/payments/initiate", {"json": {"phone_number": "258841234567", "amount": 10}}),
            ("POST", "/api/payments/TXN-1/reverse", {}),
            ("POST", "/api/payments/TXN-1/refresh", {}),
            ("POST", "/api/payments/callback/c2b", {"json": {"input_ThirdPartyReference": "X", "input_ResultCode": "INS-0"}}),
            ("POST", "/api/payments/webhooks/1/replay", {}),
        ]:
            r = await api.http.request(method, url, **kw)
            out.append(f"{method} {url} -> {r.status_code} {r.text[:300]}")
    await engine.dispose()
    open("/tmp/scratch/down.txt", "w").write("\n".join(out))
