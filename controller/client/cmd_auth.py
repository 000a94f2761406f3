"""``a67 register``, ``login``, ``logout``, ``whoami``."""

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
    def login_cmd(email: str | None, password_stdin: bool) -> None:
        """Sign in to a controller; the session is kept in your config directory.

        Tokens are stored in $XDG_CONFIG_HOME/a67/credentials.json (mode 0600) and
        refreshed automatically. With --controller, later commands use that controller.

        \b
        Examples:
          a67 login --email ada@example.com
          a67 login --controller https://a67.example.com:50051 --email ada@example.com
          a67 login --email ada@example.com --password-stdin < password.txt
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
