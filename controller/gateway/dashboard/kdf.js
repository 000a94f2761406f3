// The client-side password derivation of docs/auth.md, the same as the CLI's
// (controller/client/kdf.py): the password never leaves the browser.
//
//   salt          = UTF-8("automator67/password/v1:" + normalizeEmail(email))
//   password_hash = base64(PBKDF2-HMAC-SHA-256(UTF-8(NFC(password)), salt, 600000, 32 bytes))

export const ITERATIONS = 600000;
export const SALT_PREFIX = "automator67/password/v1:";

// The server's normal form of an email (controller/auth/validation.py normalize_email):
// NFKC and trimmed; the local part case-folded (upper then lower case gives full case
// folding for what people type: "ß" → "ss") and NFKC again; the domain in IDNA ASCII form
// with the UTS #46 mapping, which the browser's URL parser applies.
export function normalizeEmail(email) {
  const text = email.normalize("NFKC").trim();
  const at = text.lastIndexOf("@");
  const fold = (s) => s.toUpperCase().toLowerCase().normalize("NFKC");
  if (at < 0) return fold(text);
  const local = fold(text.slice(0, at));
  let domain = text.slice(at + 1);
  if (/^[\x00-\x7f]*$/.test(domain)) {
    domain = domain.toLowerCase();
  } else {
    try {
      domain = new URL("http://" + domain).hostname;
    } catch {
      domain = domain.toLowerCase(); // the server will say what is wrong with it
    }
  }
  return local + "@" + domain;
}

export async function passwordHash(email, password) {
  const enc = new TextEncoder();
  const salt = enc.encode(SALT_PREFIX + normalizeEmail(email));
  const key = await crypto.subtle.importKey(
    "raw", enc.encode(password.normalize("NFC")), "PBKDF2", false, ["deriveBits"]);
  const bits = await crypto.subtle.deriveBits(
    { name: "PBKDF2", hash: "SHA-256", salt, iterations: ITERATIONS }, key, 256);
  return btoa(String.fromCharCode(...new Uint8Array(bits)));
}
