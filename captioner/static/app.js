// Run once in the page: accessible names for the example thumbnails and the photo (Gradio leaves alt=""), "<1%"
// for probabilities that gr.Label would round to "0%" (every word it shows has p > 0), and on a phone a tapped
// example scrolls the page back to the photo, and "Re-decode from here" to the caption, so the caption streams in view.
// %(phone)s is app.layout.PHONE.
(examples) => {
  const fix = () => {
    document.querySelectorAll('button.gallery-item img').forEach(img => {
      if (img.getAttribute('alt')) return;
      const name = decodeURIComponent((img.getAttribute('src') || '').split('?')[0].split('/').pop());
      img.setAttribute('alt', 'Example photo: ' + (examples[name] || name.replace(/\.[^.]+$/, '').replace(/[_-]+/g, ' ')));
    });
    document.querySelectorAll('#photo img').forEach(img => {
      if (!img.getAttribute('alt')) img.setAttribute('alt', 'The photo to caption');
    });
    document.querySelectorAll('dd.confidence').forEach(dd => {
      const t = dd.firstChild;  // change the text node itself: the label component keeps a reference to it
      if (t && t.nodeType === 3 && t.data.trim() === '0%') t.data = '<1%';
    });
  };
  new MutationObserver(fix).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                    attributes: true, attributeFilter: ['src', 'alt']});
  fix();
  document.addEventListener('click', e => {
    if (!e.target.closest || !window.matchMedia('(max-width: %(phone)s)').matches) return;
    const to = e.target.closest('button.gallery-item') ? '#photo' : e.target.closest('#redecode-btn') ? '#caption' : null;
    if (to) document.querySelector(to)?.scrollIntoView({block: 'start'});
  }, true);
}
