// InstructionBuilder in the editor: a strip under the node shows each [ref#N] of the instruction with the
// context plugged into slot ref_N (its modality and a thumbnail), in green when it is there, in red when the
// marker is dangling or malformed or the context's own text names another marker, in grey when a plugged
// context is never referenced. Slots are labelled "ref#N · modality". Presentation only: the server checks the same rules before it runs anything.
import { app } from "../../scripts/app.js";

const MARKER = /\[ref#(\d+)\]/g;
const LOOKALIKE = /\[\s*ref\s*#[^\[\]]{0,32}\]/gi;
const SLOT = /^contexts\.ref_(\d+)$/;
const COLORS = { ok: "#2e7d32", dangling: "#c62828", mismatch: "#c62828", malformed: "#c62828", unused: "#616161" };
const ROW = 26;
const THUMB = 20;

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function linkedNode(node, input) {
  const link = input?.link != null ? node.graph?.links?.[input.link] : null;
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

function markerIds(text) {
  return [...String(text ?? "").matchAll(MARKER)].map((m) => Number(m[1]));
}

// The context plugged into each slot: its node, modality, text and a thumbnail if its image has one.
function contexts(node) {
  const found = new Map();
  for (const input of node.inputs ?? []) {
    const slot = SLOT.exec(input.name);
    if (!slot) continue;
    const id = Number(slot[1]);
    const source = linkedNode(node, input);
    input.label = source ? `ref#${id} · ${widgetValue(source, "modality") ?? "?"}` : `ref#${id}`;
    if (!source) continue;
    const imageInput = source.inputs?.find((i) => i.name === "image");
    const imageNode = linkedNode(source, imageInput);
    found.set(id, { node: source, modality: widgetValue(source, "modality") ?? "?",
                    text: String(widgetValue(source, "text") ?? ""), image: imageNode?.imgs?.[0] ?? null });
  }
  return found;
}

export function analyse(instruction, plugged) {
  const entries = [];
  for (const match of String(instruction ?? "").matchAll(LOOKALIKE)) {
    if (!/^\[ref#\d+\]$/.test(match[0])) entries.push({ label: match[0], state: "malformed" });
  }
  const referenced = [...new Set(markerIds(instruction))];
  for (const id of referenced) {
    const context = plugged.get(id);
    if (!context) {
      entries.push({ id, label: `[ref#${id}] no context`, state: "dangling" });
      continue;
    }
    const foreign = markerIds(context.text).find((other) => other !== id);
    entries.push(foreign === undefined
      ? { id, label: `[ref#${id}] ${context.modality}`, state: "ok", context }
      : { id, label: `[ref#${id}] text says [ref#${foreign}]`, state: "mismatch", context });
  }
  for (const [id, context] of plugged) {
    if (!referenced.includes(id)) entries.push({ id, label: `ref#${id} unused`, state: "unused", context });
  }
  return entries;
}

function drawStrip(node, ctx) {
  const entries = analyse(widgetValue(node, "instruction"), contexts(node));
  let x = 0;
  let y = node.size[1] + 6;
  ctx.save();
  ctx.font = "12px sans-serif";
  for (const entry of entries) {
    const width = ctx.measureText(entry.label).width + (entry.context?.image ? THUMB + 14 : 12);
    if (x > 0 && x + width > Math.max(node.size[0], 200)) {
      x = 0;
      y += ROW;
    }
    ctx.fillStyle = COLORS[entry.state];
    ctx.beginPath();
    ctx.roundRect ? ctx.roundRect(x, y, width, ROW - 4, 6) : ctx.rect(x, y, width, ROW - 4);
    ctx.fill();
    let textX = x + 6;
    const image = entry.context?.image;
    if (image?.complete && image.naturalWidth) {
      ctx.drawImage(image, x + 3, y + 1, THUMB, THUMB);
      textX += THUMB + 2;
    }
    ctx.fillStyle = "#fff";
    ctx.textBaseline = "middle";
    ctx.fillText(entry.label, textX, y + (ROW - 4) / 2);
    x += width + 6;
  }
  if (entries.some((e) => COLORS[e.state] === COLORS.dangling)) {
    ctx.strokeStyle = COLORS.dangling;
    ctx.lineWidth = 2;
    const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    ctx.strokeRect(-2, -title - 2, node.size[0] + 4, node.size[1] + title + 4);
  }
  ctx.restore();
}

app.registerExtension({
  name: "InstructImagen.InstructionBuilder",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== "InstructionBuilder") return;
    const drawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const result = drawForeground?.apply(this, [ctx, ...rest]);
      if (!this.flags?.collapsed) {
        try {
          drawStrip(this, ctx);
        } catch (error) {
          console.warn("[Instruct-Imagen] could not draw the reference strip", error);
        }
      }
      return result;
    };
  },
});
