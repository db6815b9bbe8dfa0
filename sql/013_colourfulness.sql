-- How colourful each image's input was (Hasler-Suesstrunk, 0-255 scale; 0 for greyscale, whatever its
-- container). The five modalities are greyscale: scoring reads a colourful image (a photograph, a
-- secondary capture in colour) as out of distribution. NULL for images ingested before it was measured.
ALTER TABLE images ADD COLUMN colourfulness DOUBLE PRECISION;
