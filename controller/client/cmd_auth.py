"""``a67 register``, ``login``, ``logout``, ``whoami``, ``auth mfa …``, ``auth audit``."""

from __future__ import annotations

import sys

import click
import grpc
from automator67.v1 import auth_pb2

from controller.client.app import command, state
from controller.client.config import ClientConfig
from controller.client.errors import AUTH, INVALID, USAGE, CliError, from_rpc_error
from controller.client.kdf import MIN_PASSWORD_CHARS, derive_password_hash
from controller.client.render import message_dict, when
from controller.client.session import Connection, bearer


def _email(value: str | None) -> str:
    if value:
        return value
    if sys.stdin.isatty():
        return str(click.prompt("Email"))
    raise CliError("Give your email with --email.", exit_code=USAGE, reason="EMAIL_REQUIRED")


def _password(from_stdin: bool, *, confirm: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password.removesuffix("\r")
    else:
        password = str(click.prompt("Password", hide_input=True, confirmation_prompt=confirm))
    if not password:
        raise CliError("The password is empty.", exit_code=USAGE, reason="PASSWORD_REQUIRED")
    return password


def _remember(conn: Connection, email: str, access: str, refresh: str, expires_in: int) -> auth_pb2.User:
    try:
        reply = conn.auth.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(access), timeout=30
        )
    except grpc.RpcError as err:
        raise from_rpc_error(err, address=conn.address) from None
    user: auth_pb2.User = reply.user
    conn.save_session(user.email or email, user.id, access, refresh, expires_in)
    st = state()
    if st.controller_flag:
        # Later commands use the controller signed in to last.
        config = ClientConfig.load(st.config_dir)
        ClientConfig(controller=st.controller_flag, ca_cert=st.ca_cert_flag or config.ca_cert).save(
            st.config_dir
        )
    return user


def _ask_code(code: str | None, recovery_code: str | None) -> tuple[str, str]:
    if code or recovery_code:
        return code or "", recovery_code or ""
    if sys.stdin.isatty():
        return str(click.prompt("Authenticator code (or a recovery code)")).strip(), ""
    raise CliError(
        "This account has multi-factor sign-in on: give --code (or --recovery-code).",
        exit_code=USAGE,
        reason="MFA_CODE_REQUIRED",
    )


def _split_code(code: str, recovery_code: str) -> tuple[str, str]:
    """A prompted answer may be either kind: 6 digits is a TOTP code, else a recovery code."""
    if code and not (len(code) == 6 and code.isdigit()):
        return "", code
    return code, recovery_code


def _second_factor(
    conn: Connection, challenge: str, code: str | None, recovery_code: str | None
) -> auth_pb2.VerifyMfaResponse:
    totp, recovery = _split_code(*_ask_code(code, recovery_code))
    try:
        reply: auth_pb2.VerifyMfaResponse = conn.call(
            conn.auth.VerifyMfa,
            auth_pb2.VerifyMfaRequest(mfa_challenge=challenge, code=totp, recovery_code=recovery),
            auth=False,
        )
    except CliError as error:
        if error.reason == "INVALID_MFA_CODE":
            error.message = "Wrong or already used code."
            error.hint = "wait for the next code of your authenticator, then: a67 login"
        raise
    return reply


def _signed_in(user: auth_pb2.User, address: str, verb: str) -> None:
    out = state().output
    if out.as_json:
        out.json({"controller": address, "user": message_dict(user)})
    else:
        out.say(f"{verb} {user.email} on {address}.")


def register(group: click.Group) -> None:
    @command(group, "register")
    @click.option("--email", help="Your email address (prompted for if not given).")
    @click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the password from the first line of standard input (scripts).",
    )
    def register_cmd(email: str | None, password_stdin: bool) -> None:
        """Create an account and sign in.

        The password never leaves this machine: it is turned into password_hash by
        PBKDF2-HMAC-SHA-256 (docs/auth.md) before it is sent.

        \b
        Examples:
          a67 register --email ada@example.com
          printf '%s\\n' "$PASSWORD" | a67 register --email ada@example.com --password-stdin
        """
        st = state()
        address = st.address
        email = _email(email)
        password = _password(password_stdin, confirm=True)
        if len(password) < MIN_PASSWORD_CHARS:
            raise CliError(
                f"The password must be at least {MIN_PASSWORD_CHARS} characters long.",
                exit_code=INVALID,
                reason="PASSWORD_TOO_SHORT",
            )
        conn = st.connection()
        reply = conn.call(
            conn.auth.Register,
            auth_pb2.RegisterRequest(email=email, password_hash=derive_password_hash(email, password)),
            auth=False,
        )
        user = _remember(conn, email, reply.access_token, reply.refresh_token, reply.expires_in)
        _signed_in(user, address, "Created the account of")

    @command(group, "login")
    @click.option("--email", help="Your email address (prompted for if not given).")
    @click.option(
        "--password-stdin",
        is_flag=True,
        help="Read the password from the first line of standard input (scripts).",
    )
    @click.option("--code", help="A current code of your authenticator, if the account has MFA on.")
    @click.option("--recovery-code", help="A one-time recovery code instead of --code.")
    def login_cmd(
        email: str | None, password_stdin: bool, code: str | None, recovery_code: str | None
    ) -> None:
        """Sign in to a controller; the session is kept in your config directory.

        Tokens are stored in $XDG_CONFIG_HOME/a67/credentials.json (mode 0600) and
        refreshed automatically. With --controller, later commands use that controller.

        \b
        Examples:
          a67 login --email ada@example.com
          a67 login --controller https://a67.example.com:50051 --email ada@example.com
          a67 login --email ada@example.com --password-stdin < password.txt
          a67 login --email ada@example.com --code 123456      # multi-factor sign-in
        """
        st = state()
        email = _email(email)
        password = _password(password_stdin, confirm=False)
        conn = st.connection()
        try:
            reply = conn.call(
                conn.auth.Login,
                auth_pb2.LoginRequest(email=email, password_hash=derive_password_hash(email, password)),
                auth=False,
            )
        except CliError as error:
            if error.reason == "INVALID_CREDENTIALS":
                error.message = "Wrong email or password."
                error.hint = "create an account with: a67 register"
            raise
        if reply.mfa_required:
            reply = _second_factor(conn, reply.mfa_challenge, code, recovery_code)
        user = _remember(conn, email, reply.access_token, reply.refresh_token, reply.expires_in)
        _signed_in(user, st.address, "Signed in as")

    @command(group, "logout")
    def logout_cmd() -> None:
        """End the session on the controller and forget its tokens here.

        \b
        Example:
          a67 logout
        """
        st = state()
        conn = st.connection()
        stored = conn.store.get(conn.address)
        if stored is None:
            if st.output.as_json:
                st.output.json({"signed_out": False, "controller": conn.address})
            else:
                st.output.say(f"Not signed in to {conn.address}.")
            return
        try:
            conn.call(conn.auth.Logout, auth_pb2.LogoutRequest())
        except CliError as error:
            if error.exit_code != AUTH:
                raise  # the session may still be live: keep the tokens so logout can be retried
        conn.store.remove(conn.address)
        if st.output.as_json:
            st.output.json({"signed_out": True, "controller": conn.address, "email": stored.email})
        else:
            st.output.say(f"Signed out {stored.email} from {conn.address}.")

    @command(group, "whoami")
    def whoami_cmd() -> None:
        """Show who is signed in, and to which controller.

        \b
        Examples:
          a67 whoami
          a67 whoami --json
        """
        st = state()
        conn = st.connection()
        user = conn.call(conn.auth.GetCurrentUser, auth_pb2.GetCurrentUserRequest()).user
        if st.output.as_json:
            st.output.json({"controller": conn.address, "user": message_dict(user)})
            return
        st.output.fields(
            [
                ("email", user.email),
                ("user id", user.id),
                ("controller", conn.address),
                ("created", when(user.created_at)),
                ("last login", when(user.last_login)),
            ]
        )

    @group.group("auth")
    def auth_group() -> None:
        """Your account's security: multi-factor sign-in and the audit log of your secrets.

        \b
        Examples:
          a67 auth mfa status
          a67 auth mfa enroll      # then: a67 auth mfa confirm 123456
          a67 auth audit --json
        """

    @auth_group.group("mfa")
    def mfa_group() -> None:
        """Multi-factor sign-in with a TOTP authenticator app (RFC 6238).

        \b
        Turning it on:
          a67 auth mfa enroll            # shows a secret and an otpauth:// URI for your app
          a67 auth mfa confirm 123456    # the app's current code; prints recovery codes (once)
        Then a67 login asks for a code. Turning it off: a67 auth mfa disable 123456
        """

    @command(mfa_group, "enroll")
    def mfa_enroll_cmd() -> None:
        """Start enrolling an authenticator: prints its secret once.

        \b
        Example:
          a67 auth mfa enroll
        """
        st = state()
        conn = st.connection()
        reply = conn.call(conn.auth.EnrollMfa, auth_pb2.EnrollMfaRequest())
        if st.output.as_json:
            st.output.json({"secret": reply.secret, "otpauth_uri": reply.otpauth_uri})
            return
        st.output.fields([("secret", reply.secret), ("otpauth uri", reply.otpauth_uri)])
        st.output.say("Add it to your authenticator app, then: a67 auth mfa confirm <code>")

    @command(mfa_group, "confirm")
    @click.argument("code")
    def mfa_confirm_cmd(code: str) -> None:
        """Turn multi-factor sign-in on with the authenticator's current code.

        Prints one-time recovery codes: keep them somewhere safe; they are not shown again.

        \b
        Example:
          a67 auth mfa confirm 123456
        """
        st = state()
        conn = st.connection()
        reply = conn.call(conn.auth.ConfirmMfa, auth_pb2.ConfirmMfaRequest(code=code.strip()))
        codes = list(reply.recovery_codes)
        if st.output.as_json:
            st.output.json({"mfa_enabled": True, "recovery_codes": codes})
            return
        st.output.say("Multi-factor sign-in is on. Recovery codes (each works once; shown only now):")
        for recovery in codes:
            st.output.say(f"  {recovery}")

    @command(mfa_group, "disable")
    @click.argument("code", required=False)
    @click.option("--recovery-code", help="A recovery code instead of CODE.")
    def mfa_disable_cmd(code: str | None, recovery_code: str | None) -> None:
        """Turn multi-factor sign-in off; needs a current code (or a recovery code).

        \b
        Examples:
          a67 auth mfa disable 123456
          a67 auth mfa disable --recovery-code abcde-fghij
        """
        st = state()
        conn = st.connection()
        totp, recovery = _ask_code(code, recovery_code)
        conn.call(
            conn.auth.DisableMfa,
            auth_pb2.DisableMfaRequest(code=totp.strip(), recovery_code=recovery.strip()),
        )
        if st.output.as_json:
            st.output.json({"mfa_enabled": False})
        else:
            st.output.say("Multi-factor sign-in is off.")

    @command(mfa_group, "status")
    def mfa_status_cmd() -> None:
        """Whether multi-factor sign-in is on.

        \b
        Example:
          a67 auth mfa status
        """
        st = state()
        conn = st.connection()
        user = conn.call(conn.auth.GetCurrentUser, auth_pb2.GetCurrentUserRequest()).user
        if st.output.as_json:
            st.output.json({"mfa_enabled": user.mfa_enabled})
        else:
            st.output.say(f"Multi-factor sign-in is {'on' if user.mfa_enabled else 'off'} for {user.email}.")

    @command(auth_group, "audit")
    @click.option("--limit", default=50, show_default=True, help="Most events to show.")
    def audit_cmd(limit: int) -> None:
        """Every decryption of your secrets: who or what, which secret, why, when (newest first).

        \b
        Examples:
          a67 auth audit
          a67 auth audit --limit 500 --json
        """
        st = state()
        conn = st.connection()
        events: list[auth_pb2.SecretAuditEvent] = []
        token = ""
        while len(events) < limit:
            reply = conn.call(
                conn.auth.ListSecretAuditEvents,
                auth_pb2.ListSecretAuditEventsRequest(
                    page_size=min(1000, limit - len(events)), page_token=token
                ),
            )
            events.extend(reply.events)
            token = reply.next_page_token
            if not token:
                break
        if st.output.as_json:
            st.output.json({"events": [message_dict(e) for e in events]})
            return
        st.output.table(
            ["when", "actor", "secret", "key", "why"],
            [
                (when(e.created_at), e.actor, f"{e.secret_purpose} of {e.secret_owner}", e.key_id, e.reason)
                for e in events
            ],
        )
