// The model's preprocessing, as its config.json states it (timm's pretrained_cfg): a squash resize to
// input_size with Pillow's resampling, [0, 1], then (x - mean) / std, channels first. The resize is a
// port of Pillow's two-pass fixed-point resampler (libImaging/Resample.c), so the page feeds the model
// the very numbers `hf-tumor predict` does; the browser's own canvas scaling would not.

const PRECISION_BITS = 32 - 8 - 2;
const FILTERS = {
  bilinear: { support: 1.0, weight: (x) => { x = Math.abs(x); return x < 1 ? 1 - x : 0; } },
  bicubic: {
    support: 2.0,
    weight: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
};

// Per output pixel: the first input pixel, how many, and their integer weights (Pillow's precompute_coeffs
// and normalize_coeffs_8bpc).
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter.weight((x + xmin - center + 0.5) * (1 / filterscale));
      total += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = total !== 0 ? w[x] / total : w[x];
      kk[xx * ksize + x] = Math.trunc(k < 0 ? -0.5 + k * (1 << PRECISION_BITS) : 0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

function clip8(v) {
  if (v >= 1 << PRECISION_BITS << 8) return 255;
  if (v <= 0) return 0;
  return Math.floor(v / (1 << PRECISION_BITS));
}

// One 8-bit channel (width x height, row-major) resized to outW x outH as Pillow's Image.resize does.
export function resizeChannel(src, width, height, outW, outH, interpolation = "bilinear") {
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`unsupported interpolation ${interpolation}`);
  const horiz = coefficients(width, outW, filter);
  const vert = coefficients(height, outH, filter);
  const needH = outW !== width;
  const needV = outH !== height;
  const first = vert.bounds[0];
  const last = vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1];
  let temp = src;
  let tempRows = height;
  let rowOffset = 0;
  if (needH) {
    // only the rows the vertical pass reads
    tempRows = needV ? last - first : height;
    rowOffset = needV ? first : 0;
    temp = new Uint8Array(outW * tempRows);
    for (let y = 0; y < tempRows; y++) {
      const row = (y + rowOffset) * width;
      for (let xx = 0; xx < outW; xx++) {
        const xmin = horiz.bounds[xx * 2], xmax = horiz.bounds[xx * 2 + 1], k = xx * horiz.ksize;
        let ss = 1 << (PRECISION_BITS - 1);
        for (let x = 0; x < xmax; x++) ss += src[row + x + xmin] * horiz.kk[k + x];
        temp[y * outW + xx] = clip8(ss);
      }
    }
  }
  if (!needV) return temp;
  const w = needH ? outW : width;
  const shift = needH ? first : 0;
  const out = new Uint8Array(w * outH);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = vert.bounds[yy * 2] - shift, ymax = vert.bounds[yy * 2 + 1], k = yy * vert.ksize;
    for (let xx = 0; xx < w; xx++) {
      let ss = 1 << (PRECISION_BITS - 1);
      for (let y = 0; y < ymax; y++) ss += temp[(y + ymin) * w + xx] * vert.kk[k + y];
      out[yy * w + xx] = clip8(ss);
    }
  }
  return out;
}

// RGBA pixels (as a canvas gives them) to the model's input: a Float32Array (3 x size x size) and the
// same pixels in 0-255 for the domain check. A slice whose three channels are equal everywhere is resized
// once, as grey, as `hf-tumor predict` does (it gives the same numbers as resizing each channel).
export function toModelInput(rgba, width, height, cfg) {
  const size = cfg.input_size[2];
  const n = width * height;
  const channels = [new Uint8Array(n), new Uint8Array(n), new Uint8Array(n)];
  let neutral = true;
  for (let i = 0; i < n; i++) {
    const a = rgba[i * 4 + 3];
    for (let c = 0; c < 3; c++) {
      // transparency composited over black, as the Python reader does (MRI background is black)
      const v = a === 255 ? rgba[i * 4 + c] : Math.round((rgba[i * 4 + c] * a) / 255);
      channels[c][i] = v;
    }
    if (neutral && (channels[0][i] !== channels[1][i] || channels[0][i] !== channels[2][i])) neutral = false;
  }
  const resized = neutral
    ? Array(3).fill(resizeChannel(channels[0], width, height, size, size, cfg.interpolation))
    : channels.map((ch) => resizeChannel(ch, width, height, size, size, cfg.interpolation));
  const input = new Float32Array(3 * size * size);
  const pixels = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    const mean = Math.fround(cfg.mean[c]), std = Math.fround(cfg.std[c]);
    for (let i = 0; i < size * size; i++) {
      const v = Math.fround(resized[c][i] / 255);
      input[c * size * size + i] = Math.fround(Math.fround(v - mean) / std);
      pixels[c * size * size + i] = resized[c][i];
    }
  }
  return { input, pixels, size };
}

// Reasons, from image statistics alone, why this is no brain MRI slice (hf_tumor.serving.domain.image_checks on
// the model's input in 0-255, with its thresholds).
export function imageChecks(pixels, size) {
  const n = size * size;
  const gray = new Float64Array(n);
  let chroma = 0;
  for (let i = 0; i < n; i++) {
    const r = pixels[i], g = pixels[n + i], b = pixels[2 * n + i];
    const m = (r + g + b) / 3;
    gray[i] = m;
    chroma += (Math.abs(r - m) + Math.abs(g - m) + Math.abs(b - m)) / 3;
  }
  const reasons = [];
  if (chroma / n > 6) reasons.push("it is a colour image (MRI slices are grayscale)");
  let mean = 0;
  for (let i = 0; i < n; i++) mean += gray[i];
  mean /= n;
  let variance = 0, white = 0;
  for (let i = 0; i < n; i++) {
    variance += (gray[i] - mean) ** 2;
    if (gray[i] > 200) white++;
  }
  const std = Math.sqrt(variance / n);
  if (std < 4) {
    reasons.push("it is blank or nearly uniform");
    return reasons;
  }
  if (white / n > 0.5) reasons.push("it is mostly white, like a document or a page");
  let dy = 0, dx = 0;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      if (y + 1 < size) dy += Math.abs(gray[(y + 1) * size + x] - gray[y * size + x]);
      if (x + 1 < size) dx += Math.abs(gray[y * size + x + 1] - gray[y * size + x]);
    }
  }
  const roughness = (dy / ((size - 1) * size) + dx / (size * (size - 1))) / (2 * std);
  if (roughness > 0.75) reasons.push("it looks like noise rather than anatomy");
  return reasons;
}

// Width and height (and a PNG's bit depth) from a PNG or JPEG header, read before anything is decoded (a decompression bomb is
// refused from its header); null for other formats.
export function headerSize(bytes) {
  if (bytes.length >= 24 && bytes[0] === 0x89 && bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47) {
    const view = new DataView(bytes.buffer, bytes.byteOffset);
    return { format: "PNG", width: view.getUint32(16), height: view.getUint32(20), bitDepth: bytes[24] };
  }
  if (bytes.length >= 4 && bytes[0] === 0xff && bytes[1] === 0xd8) {
    let i = 2;
    while (i + 9 < bytes.length) {
      if (bytes[i] !== 0xff) { i++; continue; }
      const marker = bytes[i + 1];
      if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7) || marker === 0xff) { i += marker === 0xff ? 1 : 2; continue; }
      const length = (bytes[i + 2] << 8) | bytes[i + 3];
      if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
        return { format: "JPEG", height: (bytes[i + 5] << 8) | bytes[i + 6], width: (bytes[i + 7] << 8) | bytes[i + 8] };
      }
      i += 2 + length;
    }
    return { format: "JPEG", width: 0, height: 0 };
  }
  return null;
}

export function softmax(logits) {
  const top = Math.max(...logits);
  const e = logits.map((z) => Math.exp(z - top));
  const total = e.reduce((a, b) => a + b, 0);
  return { probabilities: e.map((v) => v / total), energy: -(top + Math.log(total)) };
}

// Whether a PNG or JPEG file holds its end marker (IEND; EOI near the end): browsers draw a truncated
// file's missing part grey without complaint, where Pillow refuses it.
export function looksComplete(bytes, format) {
  const tail = bytes.subarray(Math.max(0, bytes.length - 4096));
  if (format === "PNG") {
    for (let i = tail.length - 8; i >= 0; i--) if (tail[i] === 0x49 && tail[i + 1] === 0x45 && tail[i + 2] === 0x4e && tail[i + 3] === 0x44) return true;
    return false;
  }
  for (let i = tail.length - 2; i >= 0; i--) if (tail[i] === 0xff && tail[i + 1] === 0xd9) return true;
  return false;
}
