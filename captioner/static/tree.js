// The search tree's js_on_load (gr.HTML): a click, a tap, or Enter on a node selects it (marked at once, and sent
// to the server as the click event's {node}), which makes it the inspector's step and Re-decode's starting point.
const pick = n => {
  element.querySelectorAll('.picked').forEach(x => x.classList.remove('picked'));
  n.classList.add('picked');
  trigger('click', {node: Number(n.dataset.node)});
};
element.addEventListener('click', e => { const n = e.target.closest && e.target.closest('[data-node]'); if (n) pick(n); });
element.addEventListener('keydown', e => {
  const n = e.target.closest && e.target.closest('[data-node]');
  if (n && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); pick(n); }
});
