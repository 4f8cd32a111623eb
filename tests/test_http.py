"""Login, tokens and the small HTTP API, over a real socket against a real database."""

from __future__ import annotations

import time

import httpx
from conftest import PASSWORD, Served, World
from jose import jwt

from embedded_pg import EmbeddedPostgres


async def login(http: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await http.post("/auth/login", json={"email": email, "password": password})


async def test_login_with_json_returns_a_bearer_token_that_me_accepts(
    http: httpx.AsyncClient, world: World
) -> None:
    user = await world.user(name="Jo Bloggs")
    response = await login(http, user.email, PASSWORD)
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 3600
    assert response.headers["cache-control"] == "no-store"
    me = await http.get("/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    assert me.json()["email"] == user.email
    assert me.json()["full_name"] == "Jo Bloggs"


async def test_login_with_a_form_uses_username(http: httpx.AsyncClient, world: World) -> None:
    user = await world.user()
    response = await http.post("/auth/login", data={"username": user.email, "password": PASSWORD})
    assert response.status_code == 200
    assert response.json()["access_token"]


async def test_email_is_case_insensitive(http: httpx.AsyncClient, world: World) -> None:
    user = await world.user()
    assert (await login(http, user.email.upper(), PASSWORD)).status_code == 200


async def test_wrong_password_and_unknown_email_get_the_same_401(
    http: httpx.AsyncClient, world: World
) -> None:
    user = await world.user()
    wrong_password = await login(http, user.email, "not the password")
    unknown_email = await login(http, "nobody-here@example.com", PASSWORD)
    assert wrong_password.status_code == unknown_email.status_code == 401
    assert wrong_password.json() == unknown_email.json() == {"error": "Invalid email or password"}


async def test_malformed_login_bodies_get_4xx_never_500(http: httpx.AsyncClient) -> None:
    cases = [
        dict(content=b"{not json", headers={"Content-Type": "application/json"}),
        dict(content=b"[1, 2]", headers={"Content-Type": "application/json"}),
        dict(content=b"\xff\xfe", headers={"Content-Type": "application/json"}),
        dict(json={"email": "a@example.com"}),
        dict(json={"email": 5, "password": ["x"]}),
        dict(json={}),
        dict(content=b"email=a&password=b", headers={"Content-Type": "text/plain"}),
        dict(
            content=b"password=only", headers={"Content-Type": "application/x-www-form-urlencoded"}
        ),
        dict(content=b"x" * 1_000_000, headers={"Content-Type": "application/json"}),
        dict(content=b""),
    ]
    statuses = [(await http.post("/auth/login", **case)).status_code for case in cases]  # type: ignore[arg-type]
    assert statuses == [400, 400, 400, 422, 422, 422, 415, 422, 413, 415]


async def test_login_only_accepts_post(http: httpx.AsyncClient) -> None:
    assert (await http.get("/auth/login")).status_code == 405


def forge(claims: dict, key: str, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


async def test_me_refuses_bad_tokens(
    http: httpx.AsyncClient, world: World, service: Served
) -> None:
    user = await world.user()
    secret = service.settings.jwt_secret
    now = int(time.time())
    good = {"sub": str(user.id), "iat": now, "exp": now + 60}
    unsigned = (
        jwt.encode(good, "", algorithm="HS256")
        .rsplit(".", 1)[0]
        .replace("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0")
        + "."
    )
    tokens = {
        "other key": forge(good, "another-secret-" + "y" * 40),
        "expired": forge({**good, "iat": now - 7200, "exp": now - 3600}, secret),
        "alg none": unsigned,
        "no sub": forge({"iat": now, "exp": now + 60}, secret),
        "sub not a uuid": forge({**good, "sub": "admin"}, secret),
        "no exp": forge({"sub": str(user.id), "iat": now}, secret),
        "garbage": "not-a-token",
    }
    for name, token in tokens.items():
        response = await http.get("/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, name
    assert (await http.get("/me")).status_code == 401
    ok = await http.get("/me", headers={"Authorization": f"Bearer {forge(good, secret)}"})
    assert ok.status_code == 200


async def test_impacts_lists_the_callers_plans_with_steps_in_order(
    http: httpx.AsyncClient, world: World
) -> None:
    user, stranger = await world.user(), await world.user()
    plan = await world.plan(user, title="Learn Spanish", steps=3)
    await world.plan(stranger, title="Not yours")
    response = await http.get("/impacts", headers={"Authorization": f"Bearer {user.token}"})
    assert response.status_code == 200
    [impact] = response.json()
    assert impact["title"] == "Learn Spanish"
    assert [s["id"] for s in impact["steps"]] == [str(s) for s in plan.step_ids]
    assert [s["order"] for s in impact["steps"]] == [1, 2, 3]
    assert (await http.get("/impacts")).status_code == 401


async def test_health_and_readiness(http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    assert (await http.get("/readyz")).status_code == 200


async def test_readiness_fails_when_the_database_is_unreachable(serve_app, tmp_root) -> None:
    server = EmbeddedPostgres(tmp_root / "doomed", throwaway=True)
    dsn = server.start()
    try:
        async with (
            serve_app(database_url=dsn) as served,
            httpx.AsyncClient(base_url=served.url) as client,
        ):
            assert (await client.get("/readyz")).status_code == 200
            server.stop()
            response = await client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["database"] == "unreachable"
            assert (await client.get("/healthz")).status_code == 200
    finally:
        server.stop()
