// ---- shared by the playground and the annotation page: serve/page_headers.py writes it into each one's script ----

// a file's first bytes name its format, as the service's decoder tells them apart (WebP: RIFF....WEBP)
const SIGNATURES = [
  ["png", [0x89, 0x50, 0x4e, 0x47]], ["jpeg", [0xff, 0xd8, 0xff]], ["gif", [0x47, 0x49, 0x46, 0x38]],
  ["bmp", [0x42, 0x4d]], ["tiff", [0x49, 0x49, 0x2a, 0x00]], ["tiff", [0x4d, 0x4d, 0x00, 0x2a]],
];
// a 2 x 1 WebP whose EXIF orientation is 6 (a quarter turn): a browser that shows it 1 x 2 turns WebPs itself
const TURNED_WEBP = "UklGRlIAAABXRUJQVlA4WAoAAAAIAAAAAQAAAAAAVlA4TBEAAAAvAQAAAAfQ//73v/+BiOh/AABFWElGGgAAAE1NACoAAAAI" +
  "AAEBEgADAAAAAQAGAAAAAAAA";

const KEY_STORAGE = "rorem.apiKey";  // this tab only (sessionStorage): shared with the annotation page opened in it, gone with the tab

/**
 * The API key this tab keeps; none in a window another site opened. A browser copies the opening tab's
 * sessionStorage into a popup, so a page of any site visited next in the tab where the key was typed could open
 * this page holding it, and the user's next keystroke would answer a rating under that key. The service marks a
 * page another site's navigation led to (serve/page_headers.py, by Sec-Fetch-Site: what an opener that disowned
 * this window, or went back to this site, cannot hide); where the browser sends no such header, the opener says.
 */
function storedKey() {
  let foreign = document.body.dataset.openedByAnotherSite === "true";
  if (!foreign && window.opener) {
    try {
      foreign = window.opener.location.origin !== location.origin;
    } catch (_) {
      foreign = true;  // another origin's window: its location cannot be read
    }
  }
  if (foreign) sessionStorage.removeItem(KEY_STORAGE);
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

/** Why the key cannot be sent, or "". A key is printable ASCII (serve/auth.py); fetch() throws on others. */
function keyProblem(key) {
  const chars = [...key];
  const at = chars.findIndex((char) => char < "!" || char > "~");
  if (at < 0) return "";
  const code = chars[at].codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  return `the API key has a character no key has (U+${code}, character ${at + 1} of ${chars.length}): ` +
    "type or paste it again without it";
}

/** The last part of a problem's type (serve/problems.py), e.g. "forbidden"; "" for another answer. */
function problemSlug(problem) {
  return String((problem && problem.type) || "").split("/").pop();
}

/** A canvas's 2D context; an Error in words where this browser makes none (a canvas larger than it can hold). */
function context2d(canvas) {
  const ctx = canvas.getContext("2d");
  if (ctx) return ctx;
  throw new Error(`this browser cannot draw a picture of ${canvas.width} × ${canvas.height} px ` +
    "(Safari on iPhone and iPad draws 16.7 megapixels at most)");
}

async function bytesOf(blob, start, end) {
  return new Uint8Array(await blob.slice(start, end).arrayBuffer());
}

function ascii(bytes, start, end) {
  return String.fromCharCode(...bytes.subarray(start, end));
}

function formatOf(head) {
  if (ascii(head, 0, 4) === "RIFF" && ascii(head, 8, 12) === "WEBP") return "webp";
  const found = SIGNATURES.find(([, signature]) => signature.every((byte, i) => head[i] === byte));
  return found ? found[0] : "";
}

/**
 * The EXIF orientation (2-8) of a WebP that this browser shows as stored, else 1. The service turns every photo
 * upright by its EXIF orientation; browsers do so for JPEG and PNG, and some (not Chromium) for WebP.
 */
async function webpOrientation(blob) {
  if (formatOf(await bytesOf(blob, 0, 12)) !== "webp" || await browserTurnsWebp()) return 1;
  for (let position = 12, chunks = 0; position + 8 <= blob.size && chunks < 64; chunks++) {
    const header = await bytesOf(blob, position, position + 8);
    const size = new DataView(header.buffer).getUint32(4, true);
    if (ascii(header, 0, 4) === "EXIF") {
      return exifOrientation(await bytesOf(blob, position + 8, position + 8 + Math.min(size, 65536)));
    }
    position += 8 + size + (size & 1);
  }
  return 1;
}

/** Whether this browser turns a WebP by its EXIF orientation itself: asked once (of TURNED_WEBP), not by size. */
function browserTurnsWebp() {
  if (!browserTurnsWebp.answer) {
    const bytes = Uint8Array.from(atob(TURNED_WEBP), (char) => char.charCodeAt(0));
    const url = URL.createObjectURL(new Blob([bytes], { type: "image/webp" }));
    const image = new Image();
    image.src = url;
    browserTurnsWebp.answer = image.decode()
      .then(() => image.naturalHeight > image.naturalWidth, () => false)
      .finally(() => URL.revokeObjectURL(url));
  }
  return browserTurnsWebp.answer;
}

/** Tag 0x0112 of an EXIF block's first IFD (TIFF layout, after an optional "Exif\0\0"), as PIL reads it. */
function exifOrientation(exif) {
  const start = ascii(exif, 0, 6) === "Exif\0\0" ? 6 : 0;
  const order = ascii(exif, start, start + 2);
  if (order !== "II" && order !== "MM") return 1;
  const little = order === "II";
  try {
    const view = new DataView(exif.buffer, exif.byteOffset + start);
    const ifd = view.getUint32(4, little);
    for (let i = 0, count = view.getUint16(ifd, little); i < count; i++) {
      const entry = ifd + 2 + 12 * i;
      if (view.getUint16(entry, little) === 0x0112) {
        const value = view.getUint16(entry + 8, little);
        return value >= 1 && value <= 8 ? value : 1;
      }
    }
  } catch (_) { /* cut short: no orientation */ }
  return 1;
}

/** A decoded image (width x height) upright: itself, or drawn turned on a canvas (as PIL's exif_transpose). */
function upright(image, width, height, orientation) {
  if (orientation === 1) return { picture: image, width, height };
  const turned = orientation >= 5;
  const canvas = document.createElement("canvas");
  canvas.width = turned ? height : width;
  canvas.height = turned ? width : height;
  const ctx = context2d(canvas);
  ctx.setTransform(...{
    2: [-1, 0, 0, 1, width, 0], 3: [-1, 0, 0, -1, width, height], 4: [1, 0, 0, -1, 0, height],
    5: [0, 1, 1, 0, 0, 0], 6: [0, 1, -1, 0, height, 0], 7: [0, -1, -1, 0, height, width], 8: [0, -1, 1, 0, 0, width],
  }[orientation]);
  ctx.drawImage(image, 0, 0);
  return { picture: canvas, width: canvas.width, height: canvas.height };
}
